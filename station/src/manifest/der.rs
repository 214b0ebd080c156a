//! Just enough DER to write a SignedData whose content is streamed from a file, and to find the
//! parts of one without copying its (possibly large) content.
//!
//! Only definite lengths and one-byte tags, which is all DER SignedData uses. Everything is
//! bounds-checked: a short or malformed input is an error, never a panic.

/// A malformed encoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerError(pub &'static str);

/// One element: its tag, its whole encoding, and its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tlv<'a> {
    /// The tag byte.
    pub tag: u8,
    /// Tag, length and value.
    pub raw: &'a [u8],
    /// The value.
    pub value: &'a [u8],
}

/// The encoding of a definite length.
pub fn length(n: usize) -> Vec<u8> {
    if n < 0x80 {
        return vec![n as u8];
    }
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    let mut out = vec![0x80 | (bytes.len() - skip) as u8];
    out.extend_from_slice(&bytes[skip..]);
    out
}

/// Tag and length of an element whose value is `len` bytes.
pub fn header(tag: u8, len: usize) -> Vec<u8> {
    let mut h = vec![tag];
    h.extend(length(len));
    h
}

/// The encoded size of an element whose value is `len` bytes.
pub fn size(len: usize) -> usize {
    1 + length(len).len() + len
}

/// Reads one element at the start of `buf`; returns it and what follows.
pub fn read(buf: &[u8]) -> Result<(Tlv<'_>, &[u8]), DerError> {
    let tag = *buf.first().ok_or(DerError("truncated before a tag"))?;
    if tag & 0x1F == 0x1F {
        return Err(DerError("multi-byte tags are not used here"));
    }
    let first = *buf.get(1).ok_or(DerError("truncated before a length"))?;
    let (len, hdr) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 {
            return Err(DerError("indefinite or oversized length"));
        }
        let bytes = buf
            .get(2..2 + n)
            .ok_or(DerError("truncated inside a length"))?;
        let len = bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
        (len, 2 + n)
    };
    let end = hdr.checked_add(len).ok_or(DerError("length overflows"))?;
    if end > buf.len() {
        return Err(DerError("an element runs past the end"));
    }
    Ok((
        Tlv {
            tag,
            raw: &buf[..end],
            value: &buf[hdr..end],
        },
        &buf[end..],
    ))
}

/// The total size (tag, length and value) that the element at the start of `buf` declares,
/// whether or not `buf` holds all of it; `None` if not even its header is readable.
pub fn declared_size(buf: &[u8]) -> Option<usize> {
    let first = *buf.get(1)?;
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let n = usize::from(first & 0x7F);
    if n == 0 || n > 4 {
        return None;
    }
    let len = buf
        .get(2..2 + n)?
        .iter()
        .fold(0usize, |a, b| (a << 8) | usize::from(*b));
    (2 + n).checked_add(len)
}

/// Every element inside `value`.
pub fn children(mut value: &[u8]) -> Result<Vec<Tlv<'_>>, DerError> {
    let mut out = Vec::new();
    while !value.is_empty() {
        let (t, rest) = read(value)?;
        out.push(t);
        value = rest;
    }
    Ok(out)
}

/// Reads exactly one element of `tag` that fills `buf`.
pub fn only<'a>(buf: &'a [u8], tag: u8, what: &'static str) -> Result<Tlv<'a>, DerError> {
    let (t, rest) = read(buf)?;
    if t.tag != tag || !rest.is_empty() {
        return Err(DerError(what));
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_roundtrip_and_bad_input_is_refused() {
        for n in [0usize, 1, 127, 128, 255, 256, 65535, 65536, 60_000_000] {
            let mut enc = header(0x04, n);
            enc.resize(enc.len() + n, 0xAB);
            let (t, rest) = read(&enc).unwrap();
            assert_eq!((t.tag, t.value.len(), rest.len()), (0x04, n, 0));
            assert_eq!(size(n), enc.len());
        }
        for bad in [
            &[][..],
            &[0x30],
            &[0x30, 0x85, 1, 1, 1, 1, 1],
            &[0x30, 0x80],
            &[0x30, 0x05, 1],
            &[0x1F, 0x01, 0x00],
        ] {
            assert!(read(bad).is_err(), "{bad:02x?}");
        }
    }

    #[test]
    fn declared_size_is_known_from_the_header_alone() {
        let mut enc = header(0x30, 70_000);
        enc.resize(enc.len() + 70_000, 0);
        let whole = enc.len();
        for cut in [5, 100, whole - 1, whole] {
            assert_eq!(declared_size(&enc[..cut]), Some(whole));
        }
        assert_eq!(declared_size(&[0x30]), None);
        assert_eq!(declared_size(&[0x30, 0x80]), None);
        assert_eq!(declared_size(&[0x30, 0x83, 1]), None);
    }
}
