#![no_main]
// A meter's certificate request (KEYGEN_RSP): parsed and checked; anything may be refused,
// nothing may panic.
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = hsm::cert::check_csr(data, hsm::Curve::P256);
    let _ = hsm::cert::check_csr(data, hsm::Curve::P384);
});
