#![no_main]
// A service API message: requests the daemon takes apart itself, replies and events a console
// reads.
libfuzzer_sys::fuzz_target!(|data: &[u8]| station::fuzz::api_message(data));
