//! Dropping root after the listening sockets are bound: setgroups (the user's supplementary
//! groups, so group-owned backend sockets stay reachable), setgid, setuid — for good.

use nix::unistd::{Gid, Group, Uid, User};

#[derive(Debug, thiserror::Error)]
pub enum PrivilegeError {
    #[error("user {0:?} does not exist")]
    NoUser(String),
    #[error("group {0:?} does not exist")]
    NoGroup(String),
    #[error("`user`/`group` is set but sniplex is not running as root (uid {0}); remove it or start as root")]
    NotRoot(u32),
    #[error("{step}: {err}")]
    Sys { step: &'static str, err: nix::Error },
    #[error("privileges could be regained after dropping them; refusing to run")]
    NotPermanent,
}

/// Drops to `user` (and `group`, default the user's primary group) if running as root.
/// Returns the new uid, or `None` when there was nothing to do.
pub fn drop_to(
    user: Option<&str>,
    group: Option<&str>,
) -> Result<Option<(u32, u32)>, PrivilegeError> {
    if user.is_none() && group.is_none() {
        return Ok(None);
    }
    let euid = Uid::effective();
    let sys = |step| move |err| PrivilegeError::Sys { step, err };
    let user_entry = match user {
        Some(name) => Some(
            User::from_name(name)
                .map_err(sys("getpwnam"))?
                .ok_or_else(|| PrivilegeError::NoUser(name.to_owned()))?,
        ),
        None => None,
    };
    let gid = match group {
        Some(name) => {
            Group::from_name(name)
                .map_err(sys("getgrnam"))?
                .ok_or_else(|| PrivilegeError::NoGroup(name.to_owned()))?
                .gid
        }
        None => user_entry.as_ref().map_or(Gid::effective(), |u| u.gid),
    };
    let uid = user_entry.as_ref().map_or(euid, |u| u.uid);
    if !euid.is_root() {
        if uid == euid && gid == Gid::effective() {
            return Ok(None);
        }
        return Err(PrivilegeError::NotRoot(euid.as_raw()));
    }
    match &user_entry {
        Some(u) => {
            let cname = std::ffi::CString::new(u.name.as_bytes())
                .map_err(|_| PrivilegeError::NoUser(u.name.clone()))?;
            nix::unistd::initgroups(&cname, gid).map_err(sys("initgroups"))?;
        }
        None => nix::unistd::setgroups(&[gid]).map_err(sys("setgroups"))?,
    }
    nix::unistd::setresgid(gid, gid, gid).map_err(sys("setresgid"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(sys("setresuid"))?;
    if !uid.is_root() && nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(PrivilegeError::NotPermanent);
    }
    Ok(Some((uid.as_raw(), gid.as_raw())))
}
