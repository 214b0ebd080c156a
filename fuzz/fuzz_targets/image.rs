#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| line_protocol::fuzz::image(data));
