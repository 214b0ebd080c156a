//! Rating-plate labels printed at the cell when it assigns the serial numbers: one ZPL II label
//! per done meter, sent to a label printer on raw TCP (port 9100), with the manufacturer, the
//! serial number, the system title and the logical device name in text and in a QR code. A label
//! is printed after the meter's record is done; a printer that cannot be reached never stops the
//! line (the failure is audited and the label can be printed again from the console).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// What a label shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    /// The manufacturer's name.
    pub manufacturer: String,
    /// Serial number.
    pub serial: String,
    /// System title, hex.
    pub system_title: String,
    /// Logical device name.
    pub ldn: String,
}

/// Text for a ZPL field with `^FH`: every byte that is not a letter, a digit, a space or one of
/// `-.:/` becomes `_XX`, so that no field can carry a ZPL command (`^`, `~`) or break the label.
fn field(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b" -.:/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("_{b:02X}"));
        }
    }
    out
}

impl Label {
    /// The data of the QR code: `SN:<serial>;ST:<system title>;LDN:<ldn>`.
    pub fn code(&self) -> String {
        format!(
            "SN:{};ST:{};LDN:{}",
            self.serial, self.system_title, self.ldn
        )
    }

    /// The label in ZPL II: 4 × 2 inches at 203 dpi, UTF-8 (`^CI28`), texts left, QR code right.
    pub fn zpl(&self) -> String {
        format!(
            "^XA\n^CI28\n^PW812\n^LL406\n\
             ^FO40,30^A0N,34,34^FH^FD{}^FS\n\
             ^FO40,90^A0N,30,30^FH^FDS/N {}^FS\n\
             ^FO40,140^A0N,30,30^FH^FDSystem title {}^FS\n\
             ^FO40,190^A0N,26,26^FH^FDLDN {}^FS\n\
             ^FO560,40^BQN,2,6^FH^FDLA,{}^FS\n\
             ^XZ\n",
            field(&self.manufacturer),
            field(&self.serial),
            field(&self.system_title),
            field(&self.ldn),
            field(&self.code()),
        )
    }
}

/// Sends one label to the printer at `addr` (raw TCP), within `timeout`.
pub async fn print(addr: SocketAddr, zpl: &str, timeout: Duration) -> std::io::Result<()> {
    let send = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(zpl.as_bytes()).await?;
        s.shutdown().await
    };
    tokio::time::timeout(timeout, send).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the printer did not answer in time",
        )
    })?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_carries_its_fields_and_no_field_can_carry_a_command() {
        let l = Label {
            manufacturer: "Acme ^XZ~JR Meters".into(),
            serial: "E2E000001234".into(),
            system_title: "444D5700000004D2".into(),
            ldn: "DMW0000000001234".into(),
        };
        let z = l.zpl();
        assert!(z.starts_with("^XA") && z.trim_end().ends_with("^XZ"));
        assert_eq!(z.matches("^XZ").count(), 1, "{z}");
        assert!(!z.contains("~JR"), "{z}");
        assert!(z.contains("^FDS/N E2E000001234^FS"));
        assert!(
            z.contains("^FDLA,SN:E2E000001234_3BST:444D5700000004D2_3BLDN:DMW0000000001234^FS")
        );
        assert!(z.contains("Acme _5EXZ_7EJR Meters"));
    }
}
