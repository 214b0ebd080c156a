#![no_main]
// What the factory registry hands back, and the registry connection file.
libfuzzer_sys::fuzz_target!(|data: &[u8]| station::fuzz::registry_answer(data));
