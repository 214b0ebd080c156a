#![no_main]
// The station's configuration file.
libfuzzer_sys::fuzz_target!(|data: &[u8]| station::fuzz::config(data));
