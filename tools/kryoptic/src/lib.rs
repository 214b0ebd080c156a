//! Nothing here: this package only pins the Kryoptic build (`cargo build -p kryoptic`).
