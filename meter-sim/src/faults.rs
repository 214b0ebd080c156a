//! Fault injection: the ways an emulated meter can misbehave, parsed from the command line.
//!
//! Application faults (what the meter answers) are read by [`crate::flash::FlashMeter`]; line
//! faults (bytes dropped, corrupted, delayed; reboots; replays; silence) by [`crate::nest`].
//! Every fault has a stable name so that tests and operators can ask for exactly one.

use line_protocol::msg::{Lifecycle, ty};

/// The faults one meter exhibits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Probability of dropping each byte, both directions.
    pub drop_bytes: f64,
    /// Probability of flipping one bit of each byte, both directions.
    pub corrupt_bytes: f64,
    /// Delay before each write of the meter, in milliseconds.
    pub delay_ms: u64,
    /// Reboot once when the firmware transfer first passes this percentage.
    pub reboot_at_percent: Option<u8>,
    /// Report a wrong image hash in FW_RESULT.
    pub wrong_hash: bool,
    /// After answering a request of this type, send the previous frame again.
    pub replay_after: Option<u8>,
    /// Invalid proof of possession in certificate requests.
    pub bad_pop: bool,
    /// Report this lifecycle in HELLO_ACK.
    pub lie_lifecycle: Option<Lifecycle>,
    /// Answer SEAL as sealed without sealing.
    pub fake_seal: bool,
    /// A sealed meter answers every SEAL with LOCKED, a repeated one too (older bootloaders).
    pub locked_reseal: bool,
    /// Stop answering from the first request of this type on.
    pub silent_at: Option<u8>,
    /// The meter is pulled out of the nest on the first request of this type (unanswered) and
    /// the next meter is put in at once: the station's retries reach the next meter.
    pub swap_at: Option<u8>,
    /// A broken random generator: every key pair generated is the same one.
    pub broken_trng: bool,
    /// The first answer to a request of this type is lost on the line (the request was handled).
    pub lose_response: Option<u8>,
    /// Lose the first answer to every request type (`lose-response:all`).
    pub lose_response_all: bool,
    /// Report another image version in FW_RESULT than the image header carries.
    pub wrong_version: bool,
    /// List a certificate twice in the attestation receipt.
    pub extra_receipt_cert: bool,
    /// The debug port stays enabled through SEAL (the meter reports it truthfully).
    pub debug_open: bool,
}

/// Names accepted for request types in `replay:`, `silent-at:`, `swap-at:` and
/// `lose-response:`.
pub fn request_type(name: &str) -> Option<u8> {
    Some(match name {
        "hello" => ty::HELLO,
        "channel-open" => ty::CHANNEL_OPEN,
        "status" => ty::STATUS,
        "identity" => ty::IDENTITY,
        "keygen" => ty::KEYGEN,
        "put-cert" => ty::PUT_CERT,
        "put-anchor" => ty::PUT_ANCHOR,
        "put-key" => ty::PUT_KEY,
        "fw-begin" => ty::FW_BEGIN,
        "fw-data" => ty::FW_DATA,
        "fw-end" => ty::FW_END,
        "seal" => ty::SEAL,
        "attest" => ty::ATTEST,
        _ => return None,
    })
}

/// The list printed by `--help`.
pub const FAULT_HELP: &str = "\
drop-bytes:P        drop each byte with probability P (both directions)
corrupt-bytes:P     flip one bit of each byte with probability P (both directions)
delay:MS            delay every write of the meter by MS milliseconds
reboot-at:PCT       reboot once when the firmware transfer passes PCT percent
wrong-hash          report a wrong image hash after verifying the image
wrong-version       report another image version than the header's after verifying it
extra-receipt-cert  list a certificate twice in the attestation receipt
replay:REQ          after answering REQ, send the previous frame again
bad-pop             certificate requests carry an invalid proof of possession
lie-lifecycle:STATE report lifecycle STATE (blank, personalized, sealed) in HELLO
fake-seal           answer SEAL as sealed without sealing
locked-reseal       once sealed, answer every SEAL with LOCKED, a repeated one too (older
                    bootloaders)
silent-at:REQ       stop answering from the first REQ on
swap-at:REQ         pull the meter out at the first REQ (unanswered); the next meter goes
                    in at once and gets the station's retries
broken-trng         generate the same key pair every time (a broken random generator)
lose-response:REQ   handle the first REQ but lose its answer on the line (REQ all: the
                    first answer to each request type, in turn)
debug-open          leave the debug port enabled through SEAL (and say so)
REQ is one of: hello channel-open status identity keygen put-cert put-anchor put-key
fw-begin fw-data fw-end seal attest";

impl Faults {
    /// Adds one fault given as `name[:value]`.
    pub fn add<'a>(&mut self, spec: &'a str) -> Result<(), String> {
        let (name, value) = match spec.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        let need = |v: Option<&'a str>| {
            v.ok_or_else(|| format!("fault {name} needs a value (see --help)"))
        };
        let prob = |v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|p| (0.0..=1.0).contains(p))
                .ok_or_else(|| format!("fault {name}: {v:?} is not a probability between 0 and 1"))
        };
        let req =
            |v: &str| request_type(v).ok_or_else(|| format!("fault {name}: unknown request {v:?}"));
        match name {
            "drop-bytes" => self.drop_bytes = prob(need(value)?)?,
            "corrupt-bytes" => self.corrupt_bytes = prob(need(value)?)?,
            "delay" => {
                self.delay_ms = need(value)?.parse().map_err(|_| {
                    format!("fault delay: {value:?} is not a number of milliseconds")
                })?
            }
            "reboot-at" => {
                let p: u8 = need(value)?
                    .parse()
                    .ok()
                    .filter(|p| *p <= 100)
                    .ok_or_else(|| "fault reboot-at: give a percentage 0..100".to_string())?;
                self.reboot_at_percent = Some(p);
            }
            "wrong-hash" => self.wrong_hash = true,
            "wrong-version" => self.wrong_version = true,
            "extra-receipt-cert" => self.extra_receipt_cert = true,
            "replay" => self.replay_after = Some(req(need(value)?)?),
            "bad-pop" => self.bad_pop = true,
            "lie-lifecycle" => {
                self.lie_lifecycle = Some(match need(value)? {
                    "blank" => Lifecycle::Blank,
                    "personalized" => Lifecycle::Personalized,
                    "sealed" => Lifecycle::Sealed,
                    other => return Err(format!("fault lie-lifecycle: unknown state {other:?}")),
                })
            }
            "fake-seal" => self.fake_seal = true,
            "locked-reseal" => self.locked_reseal = true,
            "silent-at" => self.silent_at = Some(req(need(value)?)?),
            "swap-at" => self.swap_at = Some(req(need(value)?)?),
            "broken-trng" => self.broken_trng = true,
            "lose-response" if value == Some("all") => self.lose_response_all = true,
            "lose-response" => self.lose_response = Some(req(need(value)?)?),
            "debug-open" => self.debug_open = true,
            other => {
                return Err(format!(
                    "unknown fault {other:?}; known faults:\n{FAULT_HELP}"
                ));
            }
        }
        Ok(())
    }

    /// Parses a comma-separated list.
    pub fn parse(list: &str) -> Result<Faults, String> {
        let mut f = Faults::default();
        for spec in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            f.add(spec)?;
        }
        Ok(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_fault_and_refuses_nonsense() {
        let f = Faults::parse("drop-bytes:0.01,corrupt-bytes:1e-4,delay:5,reboot-at:50,wrong-hash,replay:status,bad-pop,lie-lifecycle:sealed,fake-seal,silent-at:seal,lose-response:seal,debug-open").unwrap();
        assert_eq!(f.lose_response, Some(ty::SEAL));
        assert!(f.debug_open);
        assert_eq!(f.drop_bytes, 0.01);
        assert_eq!(f.reboot_at_percent, Some(50));
        assert_eq!(f.replay_after, Some(ty::STATUS));
        assert_eq!(f.lie_lifecycle, Some(Lifecycle::Sealed));
        assert_eq!(f.silent_at, Some(ty::SEAL));
        assert!(f.wrong_hash && f.bad_pop && f.fake_seal);
        for bad in [
            "drop-bytes:2",
            "reboot-at:101",
            "replay:nothing",
            "lie-lifecycle:odd",
            "frobnicate",
            "delay",
        ] {
            assert!(Faults::parse(bad).is_err(), "{bad}");
        }
    }
}
