//! User and group names to ids (`auth.socket_owner`, `auth.socket_group`),
//! shared by configuration validation (`check-config` and start-up refuse a
//! name that does not exist) and by the socket set-up that applies them.
//! A number is taken as an id as it is.

use std::ffi::CString;

/// The uid of user `name` (or `name` itself, when a number).
pub fn user_id(name: &str) -> Result<u32, String> {
    if let Ok(uid) = name.parse::<u32>() {
        return Ok(uid);
    }
    let c = CString::new(name).map_err(|_| format!("`{name}` contains NUL"))?;
    // SAFETY: an all-zero `passwd` is a valid value of this plain C struct
    // (null pointers, zero ids); getpwnam_r overwrites it.
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: `c` is a NUL-terminated
    // string, `pwd` and `out` are locals, `buf` is a live buffer whose
    // length is passed; getpwnam_r writes only within them.
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("no user `{name}` on this system"));
    }
    Ok(pwd.pw_uid)
}

/// The gid of group `name` (or `name` itself, when a number).
pub fn group_id(name: &str) -> Result<u32, String> {
    if let Ok(gid) = name.parse::<u32>() {
        return Ok(gid);
    }
    let c = CString::new(name).map_err(|_| format!("`{name}` contains NUL"))?;
    // SAFETY: an all-zero `group` is a valid value of this plain C struct
    // (null pointers, zero ids); getgrnam_r overwrites it.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut out: *mut libc::group = std::ptr::null_mut();
    // SAFETY: as in `user_id`, for getgrnam_r.
    let rc =
        unsafe { libc::getgrnam_r(c.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("no group `{name}` on this system"));
    }
    Ok(grp.gr_gid)
}
