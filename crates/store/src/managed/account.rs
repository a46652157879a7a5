//! The unprivileged account PostgreSQL runs as when convstore is root
//! (PostgreSQL refuses to run as root): choosing and looking it up, checking
//! it can reach the cluster and the binaries, and handing it the cluster
//! directory. The switch to it happens where the programs are spawned
//! (`process::base_command`).

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use tracing::{info, warn};

use super::layout::Layout;
use super::{ManagedError, io_err};

/// The account PostgreSQL runs as under root when `database.managed_user` is
/// empty and it exists; `setup.sh` creates it.
const DEFAULT_ACCOUNT: &str = "convstore";
const FALLBACK_ACCOUNT: &str = "nobody";

/// An account PostgreSQL runs as when convstore is root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Account {
    pub(super) name: String,
    pub(super) uid: u32,
    pub(super) gid: u32,
}

pub(super) fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Every parent of `cluster_dir` must grant `account` search permission.
pub(super) fn check_traversable(cluster_dir: &Path, account: &Account) -> Result<(), ManagedError> {
    for dir in cluster_dir.ancestors().skip(1) {
        let meta = fs::metadata(dir).map_err(io_err("inspect", dir))?;
        if !may_search(meta.mode(), meta.uid(), meta.gid(), account) {
            return Err(ManagedError::NotTraversable {
                dir: dir.to_path_buf(),
                user: account.name.clone(),
                uid: account.uid,
            });
        }
    }
    Ok(())
}

/// POSIX permission check for search (x) on a directory. Supplementary
/// groups are not considered: std drops them when it switches uid.
fn may_search(mode: u32, owner: u32, group: u32, account: &Account) -> bool {
    if owner == account.uid {
        mode & 0o100 != 0
    } else if group == account.gid {
        mode & 0o010 != 0
    } else {
        mode & 0o001 != 0
    }
}

/// The cluster directory belongs to the PostgreSQL account. A data directory
/// owned by someone else (managed_user changed) is re-owned recursively.
pub(super) fn take_ownership(layout: &Layout, account: &Account) -> Result<(), ManagedError> {
    let chown = |path: &Path| {
        std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
            .map_err(io_err("change owner of", path))
    };
    chown(&layout.cluster_dir)?;
    chown(&layout.run_dir)?;
    if layout.log_path.exists() {
        chown(&layout.log_path)?;
    }
    if let Ok(meta) = fs::symlink_metadata(&layout.data_dir)
        && (meta.uid() != account.uid || meta.gid() != account.gid)
    {
        warn!(
            data_dir = %layout.data_dir.display(),
            user = %account.name,
            "The managed cluster belongs to another account; changing its owner"
        );
        chown_recursive(&layout.data_dir, account)?;
    }
    Ok(())
}

fn chown_recursive(path: &Path, account: &Account) -> Result<(), ManagedError> {
    std::os::unix::fs::lchown(path, Some(account.uid), Some(account.gid))
        .map_err(io_err("change owner of", path))?;
    let meta = fs::symlink_metadata(path).map_err(io_err("inspect", path))?;
    if meta.is_dir() {
        for entry in fs::read_dir(path).map_err(io_err("list", path))? {
            let entry = entry.map_err(io_err("list", path))?;
            chown_recursive(&entry.path(), account)?;
        }
    }
    Ok(())
}

pub(super) fn resolve_account(configured: &str) -> Result<Account, ManagedError> {
    let lookup = |name: &str| {
        lookup_account(name).map_err(|e| ManagedError::Account {
            problem: format!("looking up account `{name}` failed: {e}"),
        })
    };
    let account = if configured.is_empty() {
        match lookup(DEFAULT_ACCOUNT)? {
            Some(account) => account,
            None => lookup(FALLBACK_ACCOUNT)?.ok_or_else(|| ManagedError::Account {
                problem: format!(
                    "neither `{DEFAULT_ACCOUNT}` nor `{FALLBACK_ACCOUNT}` exists (scripts/setup.sh creates `{DEFAULT_ACCOUNT}`)"
                ),
            })?,
        }
    } else {
        lookup(configured)?.ok_or_else(|| ManagedError::Account {
            problem: format!("database.managed_user = `{configured}` does not exist"),
        })?
    };
    if account.uid == 0 {
        return Err(ManagedError::Account {
            problem: format!("account `{}` has uid 0", account.name),
        });
    }
    info!(
        user = %account.name,
        uid = account.uid,
        gid = account.gid,
        "convstore runs as root: managed PostgreSQL will run as an unprivileged account"
    );
    Ok(account)
}

/// `getpwnam_r`; `Ok(None)` when there is no such account.
fn lookup_account(name: &str) -> io::Result<Option<Account>> {
    let c_name = CString::new(name).map_err(|_| io::Error::other("name contains a NUL byte"))?;
    let mut buf: Vec<libc::c_char> = vec![0; 4096];
    loop {
        // SAFETY: passwd is plain old data; an all-zero value is valid and
        // getpwnam_r overwrites it.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: c_name is a
        // NUL-terminated string, pwd and result are live locals, and buf is
        // a writable buffer of buf.len() bytes that outlives the call (the
        // strings pwd points into are not used after buf changes).
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            let bigger = buf.len() * 2;
            buf.resize(bigger, 0);
            continue;
        }
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        return Ok(Some(Account {
            name: name.to_string(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn account(uid: u32, gid: u32) -> Account {
        Account {
            name: "pg".into(),
            uid,
            gid,
        }
    }

    #[test]
    fn search_permission_follows_posix_precedence() {
        let pg = account(100, 200);
        assert!(may_search(0o700, 100, 0, &pg));
        assert!(
            !may_search(0o077, 100, 200, &pg),
            "owner bits decide for the owner"
        );
        assert!(may_search(0o710, 0, 200, &pg));
        assert!(
            !may_search(0o701, 0, 200, &pg),
            "group bits decide for the group"
        );
        assert!(may_search(0o711, 0, 0, &pg));
        assert!(!may_search(0o770, 0, 0, &pg));
    }

    #[test]
    fn account_lookup() {
        let root = lookup_account("root")
            .expect("lookup")
            .expect("root exists");
        assert_eq!(root.uid, 0);
        assert_eq!(
            lookup_account("no-such-user-convstore-test").expect("lookup"),
            None
        );
    }
}
