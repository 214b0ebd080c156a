//! The batch's meter keys as a PSKC container (RFC 6030), the format utilities' HSM import tools
//! and key-management systems take: `keys.pskc`, written beside the manifest at export and named
//! with its SHA-256 in the manifest, so that the manifest's signature covers it.
//!
//! One `KeyPackage` per meter key: `DeviceInfo` with the manufacturer, the meter's serial number
//! and model; the key's `Id` is the meter's system title and the DLMS key role
//! (`444D5700000003E8:guek`). Each secret is the very bytes the manifest carries: the key wrapped
//! with AES key wrap (RFC 3394) under the batch transport key, which RFC 6030 §6.1 names
//! `http://www.w3.org/2001/04/xmlenc#kw-aes256`. The transport key is named in `EncryptionKey`
//! (`ds:KeyName`); a utility that has unwrapped it from the manifest (RSA-OAEP) opens the
//! container with it. Key wrap carries its own integrity check (a wrong key or a changed byte
//! fails the unwrap), so no `MACMethod` is needed.
//!
//! Nothing secret passes through here: only wrapped keys.

use std::io::{self, Write};

use super::model::MeterRecord;

/// The container's file name, beside `manifest.p7m`.
pub const FILE: &str = "keys.pskc";
/// RFC 6030 §6.1: AES key wrap with a 256-bit key-encryption key.
pub const KW_AES256: &str = "http://www.w3.org/2001/04/xmlenc#kw-aes256";

/// The name the container gives the batch transport key (`ds:KeyName`): the work order and the
/// key's check value, as the manifest states them.
pub fn transport_key_name(work_order: &str, kcv: &str) -> String {
    format!("{work_order} transport key {kcv}")
}

/// XML text or attribute value, escaped.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&apos;"),
            // Characters XML 1.0 cannot carry at all.
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => o.push('\u{fffd}'),
            c => o.push(c),
        }
    }
    o
}

/// Writes the container's head: its id (the manifest's), and the transport key's name.
pub fn begin(w: &mut impl Write, manifest_id: &str, key_name: &str) -> io::Result<()> {
    write!(
        w,
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <pskc:KeyContainer Version=\"1.0\" Id=\"{}\" xmlns:pskc=\"urn:ietf:params:xml:ns:keyprov:pskc\" \
         xmlns:xenc=\"http://www.w3.org/2001/04/xmlenc#\" xmlns:ds=\"http://www.w3.org/2000/09/xmldsig#\">\n\
         <pskc:EncryptionKey><ds:KeyName>{}</ds:KeyName></pskc:EncryptionKey>\n",
        esc(&format!("manifest-{manifest_id}")),
        esc(key_name)
    )
}

/// Writes one meter's keys, a `KeyPackage` each.
pub fn meter(w: &mut impl Write, manufacturer: &str, m: &MeterRecord) -> io::Result<()> {
    for k in &m.keys {
        write!(
            w,
            "<pskc:KeyPackage>\n\
             <pskc:DeviceInfo><pskc:Manufacturer>{}</pskc:Manufacturer><pskc:SerialNo>{}</pskc:SerialNo><pskc:Model>{}</pskc:Model></pskc:DeviceInfo>\n\
             <pskc:Key Id=\"{}:{}\" Algorithm=\"urn:smart-meter-cell:dlms:{}:{}\">\n\
             <pskc:Issuer>{}</pskc:Issuer>\n\
             <pskc:Data><pskc:Secret><pskc:EncryptedValue>\
             <xenc:EncryptionMethod Algorithm=\"{KW_AES256}\"/>\
             <xenc:CipherData><xenc:CipherValue>{}</xenc:CipherValue></xenc:CipherData>\
             </pskc:EncryptedValue></pskc:Secret></pskc:Data>\n\
             </pskc:Key>\n\
             </pskc:KeyPackage>\n",
            esc(manufacturer),
            esc(&m.serial),
            esc(&m.model),
            esc(&m.system_title),
            esc(&k.id),
            esc(&k.id),
            esc(&k.key_type),
            esc(manufacturer),
            esc(&k.wrapped),
        )?;
    }
    Ok(())
}

/// Closes the container.
pub fn end(w: &mut impl Write) -> io::Result<()> {
    w.write_all(b"</pskc:KeyContainer>\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_that_looks_like_markup_stays_text() {
        assert_eq!(
            esc("A&B <x y=\"1\"> 'q'\u{1}"),
            "A&amp;B &lt;x y=&quot;1&quot;&gt; &apos;q&apos;\u{fffd}"
        );
    }
}
