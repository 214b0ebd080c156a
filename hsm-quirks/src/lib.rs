//! A PKCS#11 module for tests only: it sits over SoftHSM and makes it behave like another HSM,
//! one quirk at a time, so that the station meets in its tests the tokens factories buy.
//!
//! The quirks are read from the module's own file name: `quirks-<q>[,<q>...].so`, e.g.
//! `quirks-no-null-kdf.so` or `quirks-sessions=16,device-error-every=3.so`
//! (`hsm::testkit::quirks_module` makes such a copy). A file name and not the environment, so
//! that one test process can load several profiles side by side: each copy is its own instance.
//!
//! | quirk | behaves like |
//! | --- | --- |
//! | `no-ecb-encrypt-data` | CloudHSM, YubiHSM 2: no `CKM_AES_ECB_ENCRYPT_DATA` |
//! | `no-null-kdf` | FIPS-mode Luna, CloudHSM: `CKM_ECDH1_DERIVE` refuses `CKD_NULL` |
//! | `kwp-at-210b` | PKCS#11 3.0 numbering: RFC 5649 only as `CKM_AES_KEY_WRAP_KWP` (0x210B) |
//! | `no-check-value` | tokens without `CKA_CHECK_VALUE` |
//! | `device-error-every=N` | a network HSM under load: every Nth `C_Sign` is `CKR_DEVICE_ERROR` |
//! | `ignore-sensitive-on-unwrap` | a token that makes unwrapped keys readable whatever was asked |
//! | `sessions=N` | YubiHSM 2 (16): at most N sessions, stated in the token information |
//! | `always-authenticate` | keys that want a log-in before every use (CKA_ALWAYS_AUTHENTICATE) |
//! | `drop-allowed-mechanisms` | a token that ignores CKA_ALLOWED_MECHANISMS in key templates |
//! | `no-session-objects` | YubiHSM 2: every key is a token object (`CKA_TOKEN` false refused) |
//! | `no-rng`, `no-login-required` | tokens unfit for a cell: the flags in the token information |
//! | `x963-kdf` | the HSMs SoftHSM is not: `CKM_ECDH1_DERIVE` with `CKD_SHA256_KDF` (emulated) |
//!
//! FIPS-mode Luna is `no-null-kdf,x963-kdf`, CloudHSM `no-ecb-encrypt-data,x963-kdf`.
//!
//! Everything else passes straight through to the module named by `HSM_QUIRKS_UNDER` (default:
//! Debian's SoftHSM). `C_Finalize` leaves the module under it initialised: other copies and the
//! test itself share it.

// A C ABI module: every entry point is called through raw pointers by a PKCS#11 application.
#![allow(unsafe_code)]

use std::ffi::{CStr, c_void};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use cryptoki_sys::*;

/// CK_UNAVAILABLE_INFORMATION.
const UNAVAILABLE: CK_ULONG = !0;

const SOFTHSM: &str = "/usr/lib/softhsm/libsofthsm2.so";

#[derive(Debug, Default, Clone, Copy)]
struct Quirks {
    no_ecb_encrypt_data: bool,
    no_null_kdf: bool,
    kwp_at_210b: bool,
    no_check_value: bool,
    device_error_every: u64,
    ignore_sensitive_on_unwrap: bool,
    sessions: Option<CK_ULONG>,
    x963_kdf: bool,
    no_rng: bool,
    no_login_required: bool,
    no_session_objects: bool,
    always_authenticate: bool,
    drop_allowed_mechanisms: bool,
}

impl Quirks {
    /// The quirks of a file stem `quirks-a,b=1`; `None` for an unknown quirk.
    fn from_stem(stem: &str) -> Option<Quirks> {
        let list = stem.strip_prefix("quirks-")?;
        let mut q = Quirks::default();
        for item in list.split(',').filter(|s| !s.is_empty()) {
            let (name, value) = item.split_once('=').unwrap_or((item, ""));
            match name {
                "no-ecb-encrypt-data" => q.no_ecb_encrypt_data = true,
                "no-null-kdf" => q.no_null_kdf = true,
                "kwp-at-210b" => q.kwp_at_210b = true,
                "no-check-value" => q.no_check_value = true,
                "ignore-sensitive-on-unwrap" => q.ignore_sensitive_on_unwrap = true,
                "device-error-every" => q.device_error_every = value.parse().ok()?,
                "sessions" => q.sessions = Some(value.parse().ok()?),
                "x963-kdf" => q.x963_kdf = true,
                "no-rng" => q.no_rng = true,
                "no-session-objects" => q.no_session_objects = true,
                "always-authenticate" => q.always_authenticate = true,
                "drop-allowed-mechanisms" => q.drop_allowed_mechanisms = true,
                "no-login-required" => q.no_login_required = true,
                "none" => {}
                _ => return None,
            }
        }
        Some(q)
    }
}

#[derive(Debug)]
struct Module {
    _lib: libloading::Library,
    under: CK_FUNCTION_LIST,
    ours: CK_FUNCTION_LIST,
    quirks: Quirks,
    signs: AtomicU64,
    open_sessions: AtomicU64,
}

static MODULE: OnceLock<Option<Module>> = OnceLock::new();

/// This module's own file name (its quirks), found through the dynamic linker.
fn own_stem() -> Option<String> {
    let mut info = libc::Dl_info {
        dli_fname: std::ptr::null(),
        dli_fbase: std::ptr::null_mut(),
        dli_sname: std::ptr::null(),
        dli_saddr: std::ptr::null_mut(),
    };
    let addr = C_GetFunctionList as *const c_void;
    // SAFETY: dladdr only reads the address and fills `info`.
    if unsafe { libc::dladdr(addr, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated path owned by the dynamic linker.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }.to_string_lossy();
    let name = path.rsplit('/').next()?;
    Some(name.strip_suffix(".so").unwrap_or(name).to_owned())
}

fn load() -> Option<Module> {
    let quirks = Quirks::from_stem(&own_stem()?)?;
    let path = std::env::var("HSM_QUIRKS_UNDER").unwrap_or_else(|_| SOFTHSM.to_owned());
    // SAFETY: loading a PKCS#11 module runs its initialisers, which is what a PKCS#11
    // application does.
    let lib = unsafe { libloading::Library::new(&path) }.ok()?;
    let mut list: *mut CK_FUNCTION_LIST = std::ptr::null_mut();
    // SAFETY: the symbol has the PKCS#11 signature; the list it returns is static in the module.
    let under = unsafe {
        let get: libloading::Symbol<unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            lib.get(b"C_GetFunctionList\0").ok()?;
        if get(&mut list) != CKR_OK || list.is_null() {
            return None;
        }
        *list
    };
    let mut ours = under;
    ours.C_Initialize = Some(initialize);
    ours.C_Finalize = Some(finalize);
    ours.C_GetTokenInfo = Some(get_token_info);
    ours.C_GetMechanismList = Some(get_mechanism_list);
    ours.C_GetMechanismInfo = Some(get_mechanism_info);
    ours.C_OpenSession = Some(open_session);
    ours.C_CloseSession = Some(close_session);
    ours.C_CloseAllSessions = Some(close_all_sessions);
    ours.C_GetAttributeValue = Some(get_attribute_value);
    ours.C_Sign = Some(sign);
    ours.C_WrapKey = Some(wrap_key);
    ours.C_UnwrapKey = Some(unwrap_key);
    ours.C_DeriveKey = Some(derive_key);
    ours.C_GenerateKey = Some(generate_key);
    ours.C_GenerateKeyPair = Some(generate_key_pair);
    ours.C_CreateObject = Some(create_object);
    Some(Module {
        _lib: lib,
        under,
        ours,
        quirks,
        signs: AtomicU64::new(0),
        open_sessions: AtomicU64::new(0),
    })
}

fn module() -> Option<&'static Module> {
    MODULE.get_or_init(load).as_ref()
}

/// The entry point: the function list of SoftHSM with the quirks' functions in place.
///
/// # Safety
/// `list` must be a valid pointer to write a function-list pointer to.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    if list.is_null() {
        return CKR_ARGUMENTS_BAD;
    }
    // SAFETY: checked non-null; applications only read the list.
    unsafe { *list = (&raw const m.ours).cast_mut() };
    CKR_OK
}

/// Calls the module underneath: `under!(name)(args...)`.
macro_rules! under {
    ($m:expr, $f:ident) => {
        match $m.under.$f {
            Some(f) => f,
            None => return CKR_FUNCTION_NOT_SUPPORTED,
        }
    };
}

fn quirks() -> Quirks {
    module().map(|m| m.quirks).unwrap_or_default()
}

/// The mechanism the module underneath knows for `t` (it numbers RFC 5649 0x210A), or `None`
/// when this profile does not offer `t`.
fn to_under(t: CK_MECHANISM_TYPE) -> Option<CK_MECHANISM_TYPE> {
    let q = quirks();
    match t {
        CKM_AES_ECB_ENCRYPT_DATA if q.no_ecb_encrypt_data => None,
        CKM_AES_KEY_WRAP_PAD if q.kwp_at_210b => None,
        CKM_AES_KEY_WRAP_KWP if q.kwp_at_210b => Some(CKM_AES_KEY_WRAP_PAD),
        other => Some(other),
    }
}

unsafe extern "C" fn initialize(args: *mut c_void) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through unchanged.
    match unsafe { under!(m, C_Initialize)(args) } {
        CKR_CRYPTOKI_ALREADY_INITIALIZED => CKR_OK,
        rv => rv,
    }
}

unsafe extern "C" fn finalize(_reserved: *mut c_void) -> CK_RV {
    // The module underneath stays initialised for the other users in this process.
    CKR_OK
}

unsafe extern "C" fn get_token_info(slot: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through; `info` is checked before it is written.
    let rv = unsafe { under!(m, C_GetTokenInfo)(slot, info) };
    if rv != CKR_OK || info.is_null() {
        return rv;
    }
    // SAFETY: checked non-null, filled by the module underneath.
    let info = unsafe { &mut *info };
    if let Some(n) = m.quirks.sessions {
        info.ulMaxSessionCount = n;
        info.ulMaxRwSessionCount = n;
    }
    if m.quirks.no_rng {
        info.flags &= !CKF_RNG;
    }
    if m.quirks.no_login_required {
        info.flags &= !CKF_LOGIN_REQUIRED;
    }
    rv
}

unsafe extern "C" fn get_mechanism_list(
    slot: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through; the list is rewritten in place within the count it reports.
    let rv = unsafe { under!(m, C_GetMechanismList)(slot, list, count) };
    if rv != CKR_OK || list.is_null() || count.is_null() {
        return rv;
    }
    // SAFETY: the module underneath wrote `*count` entries.
    unsafe {
        let all = std::slice::from_raw_parts_mut(list, *count as usize);
        let mut kept = 0;
        for i in 0..all.len() {
            let t = match all[i] {
                CKM_AES_KEY_WRAP_PAD if m.quirks.kwp_at_210b => Some(CKM_AES_KEY_WRAP_KWP),
                CKM_AES_ECB_ENCRYPT_DATA if m.quirks.no_ecb_encrypt_data => None,
                t => Some(t),
            };
            if let Some(t) = t {
                all[kept] = t;
                kept += 1;
            }
        }
        *count = kept as CK_ULONG;
    }
    rv
}

unsafe extern "C" fn get_mechanism_info(
    slot: CK_SLOT_ID,
    t: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    let Some(t) = to_under(t) else {
        return CKR_MECHANISM_INVALID;
    };
    // SAFETY: passed through.
    unsafe { under!(m, C_GetMechanismInfo)(slot, t, info) }
}

unsafe extern "C" fn open_session(
    slot: CK_SLOT_ID,
    flags: CK_FLAGS,
    app: *mut c_void,
    notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    if let Some(n) = m.quirks.sessions
        && m.open_sessions.load(Ordering::SeqCst) >= n
    {
        return CKR_SESSION_COUNT;
    }
    // SAFETY: passed through.
    let rv = unsafe { under!(m, C_OpenSession)(slot, flags, app, notify, session) };
    if rv == CKR_OK {
        m.open_sessions.fetch_add(1, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn close_session(session: CK_SESSION_HANDLE) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through.
    let rv = unsafe { under!(m, C_CloseSession)(session) };
    if rv == CKR_OK {
        let _ = m
            .open_sessions
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }
    rv
}

unsafe extern "C" fn close_all_sessions(slot: CK_SLOT_ID) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through.
    let rv = unsafe { under!(m, C_CloseAllSessions)(slot) };
    if rv == CKR_OK {
        m.open_sessions.store(0, Ordering::SeqCst);
    }
    rv
}

unsafe extern "C" fn get_attribute_value(
    session: CK_SESSION_HANDLE,
    object: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    // SAFETY: passed through; then the caller's template is rewritten within `count`.
    let rv = unsafe { under!(m, C_GetAttributeValue)(session, object, template, count) };
    if template.is_null() {
        return rv;
    }
    // SAFETY: the caller's template has `count` entries.
    let attrs = unsafe { std::slice::from_raw_parts_mut(template, count as usize) };
    if m.quirks.always_authenticate {
        for a in attrs.iter_mut().filter(|a| {
            a.type_ == CKA_ALWAYS_AUTHENTICATE && !a.pValue.is_null() && a.ulValueLen == 1
        }) {
            // SAFETY: a one-byte CK_BBOOL the module underneath filled.
            unsafe { *a.pValue.cast::<CK_BBOOL>() = CK_TRUE };
        }
    }
    if !m.quirks.no_check_value {
        return rv;
    }
    let mut hidden = false;
    for a in attrs.iter_mut().filter(|a| a.type_ == CKA_CHECK_VALUE) {
        a.ulValueLen = UNAVAILABLE;
        hidden = true;
    }
    if hidden && rv == CKR_OK {
        CKR_ATTRIBUTE_TYPE_INVALID
    } else {
        rv
    }
}

unsafe extern "C" fn sign(
    session: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    len: CK_ULONG,
    signature: *mut CK_BYTE,
    signature_len: *mut CK_ULONG,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    let every = m.quirks.device_error_every;
    if every > 0
        && !signature.is_null()
        && (m.signs.fetch_add(1, Ordering::SeqCst) + 1) % every == 0
    {
        // The operation ends, as a real failure ends it; the caller sees a device error.
        let mut scratch = [0u8; 1024];
        let mut scratch_len = scratch.len() as CK_ULONG;
        // SAFETY: passed through into a buffer of our own.
        unsafe { under!(m, C_Sign)(session, data, len, scratch.as_mut_ptr(), &mut scratch_len) };
        return CKR_DEVICE_ERROR;
    }
    // SAFETY: passed through.
    unsafe { under!(m, C_Sign)(session, data, len, signature, signature_len) }
}

/// A copy of `*mechanism` with the number the module underneath knows.
///
/// # Safety
/// `mechanism` is null or points to a valid mechanism.
unsafe fn mechanism_under(mechanism: *mut CK_MECHANISM) -> Result<Option<CK_MECHANISM>, CK_RV> {
    if mechanism.is_null() {
        return Ok(None);
    }
    // SAFETY: non-null, valid by the caller's contract.
    let mut copy = unsafe { *mechanism };
    copy.mechanism = to_under(copy.mechanism).ok_or(CKR_MECHANISM_INVALID)?;
    Ok(Some(copy))
}

/// The module and the caller's mechanism as the module underneath numbers it.
///
/// # Safety
/// `mechanism` is null or points to a valid mechanism.
unsafe fn with_mechanism(
    mechanism: *mut CK_MECHANISM,
) -> Result<(&'static Module, CK_MECHANISM), CK_RV> {
    let m = module().ok_or(CKR_GENERAL_ERROR)?;
    // SAFETY: by the caller's contract.
    match unsafe { mechanism_under(mechanism) }? {
        Some(mech) => Ok((m, mech)),
        None => Err(CKR_ARGUMENTS_BAD),
    }
}

unsafe extern "C" fn wrap_key(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the mechanism comes from the caller.
    let (m, mut mech) = match unsafe { with_mechanism(mechanism) } {
        Ok(x) => x,
        Err(rv) => return rv,
    };
    // SAFETY: passed through with our copy of the mechanism.
    unsafe { under!(m, C_WrapKey)(session, &mut mech, wrapping, key, wrapped, wrapped_len) }
}

unsafe extern "C" fn unwrap_key(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: *mut CK_BYTE,
    wrapped_len: CK_ULONG,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the mechanism comes from the caller.
    let (m, mut mech) = match unsafe { with_mechanism(mechanism) } {
        Ok(x) => x,
        Err(rv) => return rv,
    };
    if refuses_session_objects(template, count) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    // SAFETY: the caller's template has `count` entries.
    let mut attrs = unsafe { attributes(template, count) }.to_vec();
    let mut no: CK_BBOOL = CK_FALSE;
    if m.quirks.ignore_sensitive_on_unwrap {
        for a in attrs.iter_mut().filter(|a| a.type_ == CKA_SENSITIVE) {
            a.pValue = (&raw mut no).cast();
            a.ulValueLen = 1;
        }
    }
    // SAFETY: passed through with our copies of the mechanism and the template.
    unsafe {
        under!(m, C_UnwrapKey)(
            session,
            &mut mech,
            unwrapping,
            wrapped,
            wrapped_len,
            attrs.as_mut_ptr(),
            attrs.len() as CK_ULONG,
            key,
        )
    }
}

unsafe extern "C" fn derive_key(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    base: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the mechanism comes from the caller.
    let (m, mut mech) = match unsafe { with_mechanism(mechanism) } {
        Ok(x) => x,
        Err(rv) => return rv,
    };
    if refuses_session_objects(template, count) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    if m.quirks.x963_kdf
        && mech.mechanism == CKM_ECDH1_DERIVE
        && !mech.pParameter.is_null()
        && mech.ulParameterLen as usize >= size_of::<CK_ECDH1_DERIVE_PARAMS>()
    {
        // SAFETY: checked non-null and large enough for the parameters of this mechanism.
        let params = unsafe { *mech.pParameter.cast::<CK_ECDH1_DERIVE_PARAMS>() };
        if params.kdf == CKD_SHA256_KDF {
            // SAFETY: the caller's template and output handle, passed on.
            return unsafe { derive_x963(m, session, params, base, template, count, key) };
        }
    }
    if m.quirks.no_null_kdf
        && mech.mechanism == CKM_ECDH1_DERIVE
        && !mech.pParameter.is_null()
        && mech.ulParameterLen as usize >= size_of::<CK_ECDH1_DERIVE_PARAMS>()
    {
        // SAFETY: checked non-null and large enough for the parameters of this mechanism.
        let kdf = unsafe { (*mech.pParameter.cast::<CK_ECDH1_DERIVE_PARAMS>()).kdf };
        if kdf == CKD_NULL {
            return CKR_MECHANISM_PARAM_INVALID;
        }
    }
    // SAFETY: passed through with our copy of the mechanism.
    unsafe { under!(m, C_DeriveKey)(session, &mut mech, base, template, count, key) }
}

/// `CKD_SHA256_KDF` on a module without it: ECDH with the null KDF into a readable session
/// secret, the ANSI X9.63 KDF (`SHA-256(Z ‖ 00000001 ‖ SharedInfo)`) here, and the result made
/// an object with the caller's template. A test device: a real HSM never shows Z.
///
/// # Safety
/// `params` are the caller's; `template` has `count` entries; `key` is writable.
unsafe fn derive_x963(
    m: &Module,
    session: CK_SESSION_HANDLE,
    params: CK_ECDH1_DERIVE_PARAMS,
    base: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    use sha2::{Digest, Sha256};
    let mut raw = CK_ECDH1_DERIVE_PARAMS {
        kdf: CKD_NULL,
        ulSharedDataLen: 0,
        pSharedData: std::ptr::null_mut(),
        ..params
    };
    let mut mech = CK_MECHANISM {
        mechanism: CKM_ECDH1_DERIVE,
        pParameter: (&raw mut raw).cast(),
        ulParameterLen: size_of::<CK_ECDH1_DERIVE_PARAMS>() as CK_ULONG,
    };
    let (mut class, mut kind, mut len) = (CKO_SECRET_KEY, CKK_GENERIC_SECRET, 32 as CK_ULONG);
    let (mut no, mut yes) = (CK_FALSE, CK_TRUE);
    let attr = |t: CK_ATTRIBUTE_TYPE, p: *mut c_void, n: usize| CK_ATTRIBUTE {
        type_: t,
        pValue: p,
        ulValueLen: n as CK_ULONG,
    };
    let mut secret_template = [
        attr(CKA_CLASS, (&raw mut class).cast(), size_of::<CK_ULONG>()),
        attr(CKA_KEY_TYPE, (&raw mut kind).cast(), size_of::<CK_ULONG>()),
        attr(CKA_VALUE_LEN, (&raw mut len).cast(), size_of::<CK_ULONG>()),
        attr(CKA_TOKEN, (&raw mut no).cast(), 1),
        attr(CKA_SENSITIVE, (&raw mut no).cast(), 1),
        attr(CKA_EXTRACTABLE, (&raw mut yes).cast(), 1),
    ];
    let mut z_handle: CK_OBJECT_HANDLE = 0;
    // SAFETY: our own mechanism and template, the caller's base key.
    let rv = unsafe {
        under!(m, C_DeriveKey)(
            session,
            &mut mech,
            base,
            secret_template.as_mut_ptr(),
            secret_template.len() as CK_ULONG,
            &mut z_handle,
        )
    };
    if rv != CKR_OK {
        return rv;
    }
    let mut z = [0u8; 32];
    let mut read = [attr(CKA_VALUE, z.as_mut_ptr().cast(), z.len())];
    // SAFETY: reads into our own buffer; then our own object is destroyed.
    let rv = unsafe {
        let rv = under!(m, C_GetAttributeValue)(session, z_handle, read.as_mut_ptr(), 1);
        under!(m, C_DestroyObject)(session, z_handle);
        rv
    };
    if rv != CKR_OK {
        return rv;
    }
    let shared: &[u8] = if params.pSharedData.is_null() {
        &[]
    } else {
        // SAFETY: the caller's shared data of the length it gives.
        unsafe { std::slice::from_raw_parts(params.pSharedData, params.ulSharedDataLen as usize) }
    };
    let mut h = Sha256::new();
    h.update(z);
    h.update(1u32.to_be_bytes());
    h.update(shared);
    let mut value: [u8; 32] = h.finalize().into();
    // The caller's template, its CKA_VALUE_LEN (at most 32 here) giving way to the value.
    // SAFETY: the caller's template has `count` entries.
    let attrs = unsafe { attributes(template, count) };
    let mut want = 32usize;
    let mut create: Vec<CK_ATTRIBUTE> = Vec::with_capacity(attrs.len() + 1);
    for a in attrs {
        if a.type_ == CKA_VALUE_LEN && !a.pValue.is_null() {
            // SAFETY: CKA_VALUE_LEN holds a CK_ULONG.
            want = unsafe { *a.pValue.cast::<CK_ULONG>() } as usize;
        } else {
            create.push(*a);
        }
    }
    if want == 0 || want > value.len() {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    create.push(attr(CKA_VALUE, value.as_mut_ptr().cast(), want));
    // SAFETY: the caller's attributes and our value, into the caller's handle.
    let rv = unsafe {
        under!(m, C_CreateObject)(session, create.as_mut_ptr(), create.len() as CK_ULONG, key)
    };
    value.fill(0);
    z.fill(0);
    rv
}

/// The caller's attribute template as a slice (empty for a null pointer).
///
/// # Safety
/// `template` is null or points to `count` valid attributes that outlive the slice.
unsafe fn attributes<'a>(template: *const CK_ATTRIBUTE, count: CK_ULONG) -> &'a [CK_ATTRIBUTE] {
    if template.is_null() {
        &[]
    } else {
        // SAFETY: by the caller's contract.
        unsafe { std::slice::from_raw_parts(template, count as usize) }
    }
}

/// Whether a template asks for a session object (CKA_TOKEN false, or left to its default).
///
/// # Safety
/// `template` is null or has `count` valid entries.
unsafe fn session_object(template: *const CK_ATTRIBUTE, count: CK_ULONG) -> bool {
    // SAFETY: by the caller's contract.
    let attrs = unsafe { attributes(template, count) };
    match attrs.iter().find(|a| a.type_ == CKA_TOKEN) {
        // SAFETY: CKA_TOKEN holds one CK_BBOOL.
        Some(a) if !a.pValue.is_null() => unsafe { *a.pValue.cast::<CK_BBOOL>() == CK_FALSE },
        _ => true,
    }
}

/// `no-session-objects`: a session object asked for is refused, as a token without them does.
fn refuses_session_objects(template: *const CK_ATTRIBUTE, count: CK_ULONG) -> bool {
    // SAFETY: the caller's template, passed on from a PKCS#11 call.
    quirks().no_session_objects && unsafe { session_object(template, count) }
}

unsafe extern "C" fn generate_key(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    if refuses_session_objects(template, count) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    // SAFETY: passed through.
    unsafe { under!(m, C_GenerateKey)(session, mechanism, template, count, key) }
}

#[allow(clippy::too_many_arguments)] // the PKCS#11 signature
unsafe extern "C" fn generate_key_pair(
    session: CK_SESSION_HANDLE,
    mechanism: *mut CK_MECHANISM,
    public: *mut CK_ATTRIBUTE,
    public_count: CK_ULONG,
    private: *mut CK_ATTRIBUTE,
    private_count: CK_ULONG,
    public_key: *mut CK_OBJECT_HANDLE,
    private_key: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    if refuses_session_objects(private, private_count) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    // SAFETY: the caller's template has `private_count` entries.
    let mut kept = unsafe { attributes(private, private_count) }.to_vec();
    if m.quirks.drop_allowed_mechanisms {
        kept.retain(|a| a.type_ != CKA_ALLOWED_MECHANISMS);
    }
    // SAFETY: passed through, the private template our copy.
    unsafe {
        under!(m, C_GenerateKeyPair)(
            session,
            mechanism,
            public,
            public_count,
            kept.as_mut_ptr(),
            kept.len() as CK_ULONG,
            public_key,
            private_key,
        )
    }
}

unsafe extern "C" fn create_object(
    session: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
    object: *mut CK_OBJECT_HANDLE,
) -> CK_RV {
    let Some(m) = module() else {
        return CKR_GENERAL_ERROR;
    };
    if refuses_session_objects(template, count) {
        return CKR_TEMPLATE_INCONSISTENT;
    }
    // SAFETY: passed through.
    unsafe { under!(m, C_CreateObject)(session, template, count, object) }
}
