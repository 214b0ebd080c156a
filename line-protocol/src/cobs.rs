//! Consistent Overhead Byte Stuffing (COBS), the byte stuffing of every frame on the line.
//!
//! COBS removes every `0x00` from a frame so that `0x00` can delimit frames on the wire. The
//! overhead is one byte per 254 bytes of input (plus one), independent of the content. This
//! module only stuffs and unstuffs one whole frame; finding delimiters in a byte stream is the
//! job of [`crate::frame::FrameDecoder`].

/// The largest encoded length of `n` input bytes (without the delimiter).
pub const fn max_encoded_len(n: usize) -> usize {
    n + n / 254 + 1
}

/// Appends the COBS encoding of `input` to `out` (no delimiter).
pub fn encode_into(input: &[u8], out: &mut Vec<u8>) {
    out.reserve(max_encoded_len(input.len()));
    let mut code_at = out.len();
    out.push(0); // placeholder for the first code byte
    let mut code: u8 = 1;
    for &byte in input {
        if byte == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(byte);
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

/// Why a stuffed block could not be unstuffed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CobsError {
    /// A `0x00` inside the block, or a code byte pointing past its end.
    Invalid,
}

/// Decodes one COBS block (without its delimiter) into `out`, replacing its contents.
pub fn decode_into(input: &[u8], out: &mut Vec<u8>) -> Result<(), CobsError> {
    out.clear();
    let mut i = 0;
    while i < input.len() {
        let code = input[i];
        if code == 0 {
            return Err(CobsError::Invalid);
        }
        let end = i + code as usize;
        if end > input.len() {
            return Err(CobsError::Invalid);
        }
        let run = &input[i + 1..end];
        if run.contains(&0) {
            return Err(CobsError::Invalid);
        }
        out.extend_from_slice(run);
        i = end;
        // A code below 0xFF stands for a zero after its run, except at the very end.
        if code < 0xFF && i < input.len() {
            out.push(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(data: &[u8]) {
        let mut enc = Vec::new();
        encode_into(data, &mut enc);
        assert!(!enc.contains(&0), "encoding must contain no zero byte");
        assert!(enc.len() <= max_encoded_len(data.len()));
        let mut dec = Vec::new();
        decode_into(&enc, &mut dec).unwrap();
        assert_eq!(dec, data);
    }

    #[test]
    fn known_vectors_from_the_cobs_paper() {
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[0x01]),
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (raw, enc) in cases {
            let mut out = Vec::new();
            encode_into(raw, &mut out);
            assert_eq!(&out[..], *enc, "encoding {raw:02x?}");
            let mut dec = Vec::new();
            decode_into(enc, &mut dec).unwrap();
            assert_eq!(&dec[..], *raw);
        }
    }

    #[test]
    fn long_runs_without_zero() {
        for n in [253, 254, 255, 508, 509, 1000] {
            let data: Vec<u8> = (0..n).map(|i| (i % 255) as u8 + 1).collect();
            roundtrip(&data);
        }
        let mut data = vec![1u8; 254];
        data.push(0);
        roundtrip(&data);
    }

    #[test]
    fn rejects_zero_and_overrun() {
        let mut out = Vec::new();
        assert_eq!(
            decode_into(&[0x03, 0x11], &mut out),
            Err(CobsError::Invalid)
        );
        assert_eq!(
            decode_into(&[0x02, 0x00], &mut out),
            Err(CobsError::Invalid)
        );
        assert_eq!(decode_into(&[0x00], &mut out), Err(CobsError::Invalid));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_roundtrip(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2000)) {
            roundtrip(&data);
        }
    }
}
