//! The HSM's known-answer self-test (`station hsm check`, and at every start of `stationd`):
//! play the meter and the utility in software against the token, compare the bytes, and read
//! back the attributes of what the token made. Every finding is reported, not only the first;
//! a failed finding keeps the line from starting, so nothing that a check at start could have
//! found fails in the middle of a batch.

use std::fmt;
use std::time::{Duration, Instant};

use hsm::{AesKeySize, Hsm, HsmSession, KeyFlags, KeyRole, OaepHash, WrapAlg};
use line_protocol::crypto;
use line_protocol::msg::WrapAlg as LineWrap;
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::Digest;
use zeroize::Zeroizing;

/// One check and what it found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    /// What was checked, e.g. "key transport".
    pub check: &'static str,
    /// Whether the token passed.
    pub ok: bool,
    /// What was compared, or what went wrong.
    pub detail: String,
}

/// Every finding of one run.
#[derive(Debug, Clone)]
pub struct Report {
    /// In the order run.
    pub findings: Vec<Finding>,
    /// How long the run took.
    pub elapsed: Duration,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.findings.iter().all(|f| f.ok)
    }

    /// The failed findings.
    pub fn failures(&self) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(|f| !f.ok)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for x in &self.findings {
            let mark = if x.ok { "ok  " } else { "FAIL" };
            writeln!(f, "{mark}  {}: {}", x.check, x.detail)?;
        }
        let failed = self.failures().count();
        write!(
            f,
            "{} checks, {} failed, in {} ms",
            self.findings.len(),
            failed,
            self.elapsed.as_millis()
        )
    }
}

/// A 2048-bit RSA key of this self-test alone, public with the source: the token wraps a
/// throw-away key under its public half, and the self-test opens it with the private half.
/// It protects nothing.
const KAT_RSA_KEY: &str = "\
-----BEGIN PRIVATE KEY-----\n\
MIIEvgIBADANBgkqhkiG9w0BAQEFAASCBKgwggSkAgEAAoIBAQCwu0l7RvaN6NOJ\n\
m8cddKb4Elv8ezGB9Laz+nchi60QkgzMno+5L8G7u+zh7jqdffkUZrhEJArmTw6G\n\
E8mQj3GWjEDHMPqgDTgGp8avyZEk+V/1/9KsaVesbF4UT/QBLTqaWmLUqEVMTWWy\n\
cvr3FlKWcdaRg+eI430LS96Kqk90wlgS4z/3ylD4b6LhtSp6XeDPy/ryPb/OoJQQ\n\
BnRSMKtwtGakwjRRTUXJlE/4zz4aCanjbyvxly1QRarqaNBjQ/hH4x17FhhNgsaJ\n\
te4+JI9x/wxX3QX+HquxwGbQSAkKxaAbTmFskNNLz/MjF0/OYY/Ini2pqoNDDogG\n\
bL61702RAgMBAAECggEAU3ipzKVoJv9sBgcC5OknQWyecKIY8HnN3zSxlrD7VSO+\n\
EtjjJgKl3I72Y4Fawu7wOVAIwPpLAZseT3pCDdqKOiJVKB98iCKmLxKIF5e6y31S\n\
8wPYk6EPjTsDtlFK/FFJ6AQ/wJQXYuH9YerHmPM8n5z1zHXB4hgcA71aRyEIdSrZ\n\
7rB46omKsGlORlDugjE29NXf6P9qv+PMJ2cdHcLkglJONZdPvw//wpHwq1/dlMMs\n\
9zDDe9ISbqo98kutz4nMACJm10Slyp2R853u/p6SXfAC8Nb86OWEupz9ofirPBuY\n\
sZz8e7AapOmozJagNdJ84TqLKAFxAqbZg6nD+EjqVwKBgQDkl2fRK1n2PZl0m4zS\n\
Su/SrfFk17JBoBReQKO0n6SxUuvOcTDr/GsyArUhDjZtEaQqGRAWIpMBQJQSunJo\n\
i9Sw1/lFrgFuuURHXforWW8dIb3ym0GwH/TN1jKzN7pSVzW7hm98l4xR3iLhFggC\n\
mygIvGAIHWA65xzpf1DF/qLLHwKBgQDF7AxVr2sMCnPOXVJMQhtetPZMdMoglAe1\n\
aM4Mu9jLh/lLgY7QrfmHlnFCKt3RQ2iGN8Apm4Lwlh3Kv6HIA03z71duWNj9kENW\n\
rEUYfgjTTRzOfCbGAyEGQw1w6VMacOUs7PymdXsEx6bxyS41wPVQrhrR/9LdfdMw\n\
2UyDk6iBTwKBgQCiCnXsf5eZB1eVooJzu+0/YlCBFKnm/UwS+C1T5+r+THKd9/0e\n\
++MdI3A0i3enX18I/JU7q6ybsaSFlidt1tmhtqecblnTnH87O/IP8qjidL3KkaZB\n\
7JVDqHhuNK3emrWbRhQXtPIiQp5lApIRDt2VO7uzZOeHObd0Ce0/PV83LwKBgDqp\n\
G37J3xBSiMBBKIMxlKsdN2KxuratKRu7VFax1i98vYaDf7CZ37sv+6GA0v2S3Qfq\n\
vimWzdhApdPRuEFvuUrzRRaPfsCoYUzvAgugTz1RPZh1c4h8pO0WMoWkodzUWRhX\n\
pQoxB6UDB5fh6LBF4G9pKsnS6Mx83ns77FGTEf5BAoGBAJhGlsRRJahzGNzyml96\n\
qSfqW3fJ7vxSyfzr9tdBatfwIsiS6IhJbEOr2lCCywQ3dQjEYGVq5o2rVTr6X/ZK\n\
c5bR/E0F+v8XqwH1r3zUpCTgJ55YtGk/1gvtnHGsfvNnAnPmNI2bm/o+4AjIPiOf\n\
VOXMbdcUaWy5ppDx5k12eRvm\n\
-----END PRIVATE KEY-----\n";

/// The meter's ephemeral secret of the key-transport test (fixed: a known answer).
const KAT_METER_SEED: &[u8] = b"station hsm self-test: the meter's ephemeral key";

/// Runs every check (blocking: call it from a blocking thread). Objects it makes are session
/// objects, destroyed before it returns.
pub fn run(hsm: &Hsm) -> Report {
    let started = Instant::now();
    let mut findings = vec![token(hsm), token_flags(hsm)];
    let mut check = |name: &'static str, r: Result<String, String>| {
        findings.push(match r {
            Ok(detail) => Finding {
                check: name,
                ok: true,
                detail,
            },
            Err(detail) => Finding {
                check: name,
                ok: false,
                detail,
            },
        })
    };
    check(
        "signing keys",
        hsm.with_session(|s| Ok(signing_keys(s)))
            .unwrap_or_else(|e| Err(e.to_string())),
    );
    check(
        "key transport",
        hsm.with_session(|s| Ok(key_transport(s)))
            .unwrap_or_else(|e| Err(e.to_string())),
    );
    check(
        "rsa-oaep",
        hsm.with_session(|s| Ok(oaep(s)))
            .unwrap_or_else(|e| Err(e.to_string())),
    );
    Report {
        findings,
        elapsed: started.elapsed(),
    }
}

/// The token's own flags: what makes it unfit for a cell fails; what a person should see is
/// said.
fn token_flags(hsm: &Hsm) -> Finding {
    let f = match hsm.token_flags() {
        Ok(f) => f,
        Err(e) => {
            return Finding {
                check: "token flags",
                ok: false,
                detail: e.to_string(),
            };
        }
    };
    let mut unfit = Vec::new();
    if f.error_state {
        unfit.push("the token reports CKF_ERROR_STATE (it failed a self-test of its own)");
    }
    if f.write_protected {
        unfit.push("the token is write-protected (CKF_WRITE_PROTECTED): no key can be made");
    }
    if !f.login_required {
        unfit.push("the token needs no log-in (no CKF_LOGIN_REQUIRED): it does not keep the cell's keys from whoever can reach it");
    }
    if !f.rng {
        unfit.push("the token has no random number generator (no CKF_RNG): serial numbers and challenges come from it");
    }
    let mut notes = Vec::new();
    if f.user_pin_count_low {
        notes.push("wrong user PINs were entered (CKF_USER_PIN_COUNT_LOW/FINAL_TRY)");
    }
    if f.user_pin_to_be_changed || f.so_pin_to_be_changed {
        notes.push("a PIN is still the initial one and is to be changed");
    }
    if f.protected_authentication_path {
        notes.push("the token has a PIN pad (CKF_PROTECTED_AUTHENTICATION_PATH)");
    }
    if unfit.is_empty() {
        Finding {
            check: "token flags",
            ok: true,
            detail: if notes.is_empty() {
                "log-in required, a random number generator, writable".into()
            } else {
                format!(
                    "log-in required, a random number generator, writable; note: {}",
                    notes.join("; ")
                )
            },
        }
    } else {
        Finding {
            check: "token flags",
            ok: false,
            detail: unfit.join("; "),
        }
    }
}

fn token(hsm: &Hsm) -> Finding {
    let t = hsm.token();
    let limit = match hsm.session_limit() {
        Some(n) => format!("the token allows {n} sessions"),
        None => "the token states no session limit".into(),
    };
    Finding {
        check: "token",
        ok: true,
        detail: format!(
            "{} {} (serial {}); pool of {} sessions and the anchor, {limit}; {}",
            t.manufacturer,
            t.model,
            t.serial,
            hsm.pool_size(),
            hsm.mechanisms().chosen()
        ),
    }
}

/// Every signing key pair of the cell in the token (CAs, manifest and audit signers, the
/// station's identity): it signs, the signature verifies in software with the public key the
/// token gives, and both halves carry the policy's attributes.
fn signing_keys(s: &HsmSession<'_>) -> Result<String, String> {
    let mut checked = Vec::new();
    for row in hsm::POLICY
        .iter()
        .filter(|r| r.family == hsm::policy::KeyFamily::EcPair)
    {
        let Some(label) = row.label else { continue };
        let pair = match s.find_ec_keypair(label) {
            Ok(p) => p,
            Err(hsm::Error::ObjectNotFound { .. }) => continue,
            Err(e) => return Err(format!("{label}: {e}")),
        };
        let f = s
            .key_flags(&pair.private)
            .map_err(|e| format!("{label}: {e}"))?;
        differs_from_policy(&f, &row.key).map_err(|w| format!("{label}'s private key: {w}"))?;
        let msg = b"station hsm self-test";
        let sig = s
            .sign(&pair.private, msg)
            .map_err(|e| format!("{label}: {e}"))?;
        if !hsm::cert::verify_ecdsa(pair.curve, &pair.point, msg, &sig) {
            return Err(format!(
                "{label}: the token's signature does not verify in software"
            ));
        }
        checked.push(format!("{label} ({})", pair.curve.name()));
    }
    if checked.is_empty() {
        Ok("none in the token yet (`station pki` makes them)".into())
    } else {
        Ok(format!(
            "{} sign, verify in software and carry the policy's attributes",
            checked.join(", ")
        ))
    }
}

/// Where the attributes the token reports for a key differ from the policy it was made with.
fn differs_from_policy(f: &KeyFlags, p: &hsm::policy::ObjectPolicy) -> Result<(), String> {
    let wrong = p.mismatches(f);
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join(", "))
    }
}

/// The line protocol's key transport (section 5.3) with a meter played in software: the
/// token's KTK must be the meter's, and meter keys it wraps must unwrap there to keys of the
/// token's check values.
fn key_transport(s: &HsmSession<'_>) -> Result<String, String> {
    let m = s.mechanisms();
    let methods: Vec<crypto::KtkMethod> = [
        (crypto::KtkMethod::X963, m.ktk_x963),
        (crypto::KtkMethod::AesEcb, m.ktk_aes_ecb),
    ]
    .into_iter()
    .filter_map(|(method, works)| works.then_some(method))
    .collect();
    if methods.is_empty() {
        // Say why each is out of reach, in the token's own words.
        let why = |method| match key_transport_by(s, method) {
            Ok(_) => "it worked when tried again".to_string(),
            Err(e) => e,
        };
        return Err(format!(
            "neither key transport of the line protocol works on this token — AES-ECB: {}; X9.63: {}",
            why(crypto::KtkMethod::AesEcb),
            why(crypto::KtkMethod::X963)
        ));
    }
    let mut done = Vec::new();
    for method in methods {
        let detail = key_transport_by(s, method)
            .map_err(|e| format!("{} key transport: {e}", method.name()))?;
        done.push(format!("{}: {detail}", method.name()));
    }
    Ok(done.join("; "))
}

/// The key transport by `method` against a meter played in software.
fn key_transport_by(s: &HsmSession<'_>, method: crypto::KtkMethod) -> Result<String, String> {
    let (kt_private, kt_point) = s
        .generate_kt_keypair()
        .map_err(|e| format!("the key-agreement key pair: {e}"))?;
    let meter = p256::SecretKey::from_slice(&sha2::Sha256::digest(KAT_METER_SEED))
        .map_err(|_| "the test's meter key".to_string())?;
    let meter_point: [u8; 65] = meter
        .public_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .map_err(|_| "the test's meter point".to_string())?;
    let th = crypto::sha256(b"station hsm self-test transcript");
    let ktk = match method {
        crypto::KtkMethod::AesEcb => {
            s.derive_ktk(&kt_private, &meter_point, &crypto::ktk_derivation_data(&th))
        }
        crypto::KtkMethod::X963 => s.derive_ktk_x963(
            &kt_private,
            &meter_point,
            &crypto::ktk_x963_shared_info(&th),
        ),
    };
    let _ = s.destroy(&kt_private);
    let ktk = ktk.map_err(|e| e.to_string())?;
    let result = (|| {
        let station = crypto::parse_p256_point(&kt_point)
            .ok_or_else(|| "the token's key-agreement point is not on P-256".to_string())?;
        let ktk_sw = crypto::meter_ktk_with(method, &meter.to_nonzero_scalar(), &station, &th);
        let f = s.key_flags(&ktk).map_err(|e| e.to_string())?;
        differs_from_policy(&f, &s.aes_policy(KeyRole::KeyTransport))
            .map_err(|w| format!("the key-transport key as the token derived it: {w}"))?;
        let mut algs = vec![(WrapAlg::AesKw, LineWrap::AesKw, "AES-KW")];
        if s.mechanisms().kwp.is_some() {
            algs.push((WrapAlg::AesKwPad, LineWrap::AesKwp, "AES-KWP"));
        }
        for (role, size) in [
            (KeyRole::MeterGuek, AesKeySize::Aes128),
            (KeyRole::MeterKek, AesKeySize::Aes256),
        ] {
            let key = s
                .generate_aes_key(role, size, None)
                .map_err(|e| e.to_string())?;
            let r = (|| {
                let f = s.key_flags(&key).map_err(|e| e.to_string())?;
                differs_from_policy(&f, &s.aes_policy(role))
                    .map_err(|w| format!("a {role:?} key as the token made it: {w}"))?;
                if s.try_read_value(&key).is_ok() {
                    return Err(format!(
                        "the token hands out the value of a sensitive {role:?} key"
                    ));
                }
                let kcv = s.kcv(&key).map_err(|e| e.to_string())?;
                for (alg, line, name) in &algs {
                    let wrapped = s.wrap(&ktk, &key, *alg).map_err(|e| e.to_string())?;
                    let clear: Zeroizing<Vec<u8>> = crypto::unwrap_key(&ktk_sw, *line, &wrapped)
                        .ok_or_else(|| {
                            format!("the meter cannot unwrap a key the token wrapped with {name}: the token's KTK or {name} is not the spec's")
                        })?;
                    if clear.len() != size.bytes() || crypto::kcv_aes(&clear) != Some(kcv) {
                        return Err(format!(
                            "a key the token wrapped with {name} is not the key of the token's check value"
                        ));
                    }
                }
                Ok(())
            })();
            let _ = s.destroy(&key);
            r?;
        }
        Ok(format!(
            "ECDH and the KTK derivation match the meter's; {} and the check values match; meter keys carry the policy's attributes",
            algs.iter().map(|a| a.2).collect::<Vec<_>>().join(" and ")
        ))
    })();
    let _ = s.destroy(&ktk);
    result
}

/// RSA-OAEP with the chosen hash (and the label where the token takes one): the utility's
/// side, played with the self-test's key, opens what the token wrapped.
fn oaep(s: &HsmSession<'_>) -> Result<String, String> {
    use rsa::pkcs8::DecodePrivateKey;
    use rsa::traits::PublicKeyParts;
    let m = s.mechanisms();
    let Some(hash) = m.rsa_oaep else {
        return Err(
            "the token offers no usable RSA-OAEP: no batch transport key can reach a utility"
                .into(),
        );
    };
    let key = rsa::RsaPrivateKey::from_pkcs8_pem(KAT_RSA_KEY)
        .map_err(|e| format!("the self-test key: {e}"))?;
    let label = b"WO-SELF-TEST";
    let alg = if m.oaep_label {
        WrapAlg::RsaOaepLabelled(
            hash,
            hsm::OaepLabel::new(label).ok_or_else(|| "the test label".to_string())?,
        )
    } else {
        WrapAlg::RsaOaepWith(hash)
    };
    let (wrapped, value) = s
        .oaep_known_answer(&key.n().to_be_bytes(), alg)
        .map_err(|e| e.to_string())?;
    let opened = match (hash, m.oaep_label) {
        (OaepHash::Sha256, true) => key.decrypt(
            rsa::Oaep::<sha2::Sha256>::new_with_label(label.to_vec()),
            &wrapped,
        ),
        (OaepHash::Sha256, false) => key.decrypt(rsa::Oaep::<sha2::Sha256>::new(), &wrapped),
        (OaepHash::Sha1, true) => key.decrypt(
            rsa::Oaep::<sha1::Sha1>::new_with_label(label.to_vec()),
            &wrapped,
        ),
        (OaepHash::Sha1, false) => key.decrypt(rsa::Oaep::<sha1::Sha1>::new(), &wrapped),
    }
    .map(Zeroizing::new)
    .map_err(|_| {
        format!(
            "software cannot open what the token wrapped with {}",
            m.chosen_oaep()
        )
    })?;
    if *opened != *value {
        return Err(format!(
            "{} wrapped another key than it was given",
            m.chosen_oaep()
        ));
    }
    Ok(format!("{} opens in software", m.chosen_oaep()))
}
