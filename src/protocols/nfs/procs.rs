//! The MOUNT and NFSv3 procedures (RFC 1813), each a decode, an engine call and an encode.
//!
//! A failed procedure still returns attributes (RFC 1813's `wcc_data`), so the error side of
//! each result is as large as the success side: that is the protocol's shape, built once per
//! call and encoded at once.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use nfs3_types::mount::{
    dirpath, export_node, exports, fhandle3, mountres3, mountres3_ok, mountstat3,
};
use nfs3_types::nfs3::*;
use nfs3_types::rpc::accept_stat_data;
use nfs3_types::xdr_codec::{List, Opaque, Void};

use super::perm::{self, Target, Who};
use super::{Caller, NfsServer, ShareAccess, decode, encode};
use crate::engines::share::namespace::{Kind, MAX_NAME};
use crate::engines::share::{Attrs, SetAttrs, Share, ShareError};

type Outcome = Result<Vec<u8>, accept_stat_data>;

const HANDLE_VERSION: u8 = 1;
/// Largest READ and WRITE, and the preferred size of both.
const IO_MAX: u32 = 1 << 20;
/// The most bytes of entries one READDIR or READDIRPLUS reply lists, whatever its count.
const READDIR_MAX: usize = 1 << 20;

pub(super) fn mount(server: &NfsServer, caller: Caller, proc: u32, args: &[u8]) -> Outcome {
    match proc {
        0 => Ok(Vec::new()),
        // MNT
        1 => {
            let path: dirpath<'static> = decode(args)?;
            Ok(encode(&mnt(server, caller, &path.0.0)))
        }
        // DUMP: no list of mounts is kept.
        2 => Ok(encode(&List::<Void>(Vec::new()))),
        // UMNT, UMNTALL: nothing to forget.
        3 | 4 => Ok(Vec::new()),
        // EXPORT
        5 => {
            let mut list = Vec::new();
            for share in server.shares.list().unwrap_or_default() {
                list.push(export_node {
                    ex_dir: dirpath(Opaque::owned(format!("/{}", share.name).into_bytes())),
                    ex_groups: List(Vec::new()),
                });
            }
            let list: exports = List(list);
            Ok(encode(&list))
        }
        _ => Err(accept_stat_data::PROC_UNAVAIL),
    }
}

fn mnt(server: &NfsServer, caller: Caller, path: &[u8]) -> mountres3<'static> {
    let Ok(path) = std::str::from_utf8(path) else {
        return mountres3::Err(mountstat3::MNT3ERR_INVAL);
    };
    // `/<share>`, or a directory below it: `/<share>/a/b`.
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let name = parts.next().unwrap_or_default();
    let Ok(share) = server.shares.share(name) else {
        return mountres3::Err(mountstat3::MNT3ERR_NOENT);
    };
    if !(server.admit)(share.info(), caller.peer) {
        tracing::info!(peer = %caller.peer, share = name, "nfs mount refused: not in the share's allowlist");
        return mountres3::Err(mountstat3::MNT3ERR_ACCES);
    }
    let mut dir = share.root();
    for part in parts {
        dir = match share.lookup(dir, part) {
            Ok(id) => id,
            Err(ShareError::NotDir) => return mountres3::Err(mountstat3::MNT3ERR_NOTDIR),
            Err(_) => return mountres3::Err(mountstat3::MNT3ERR_NOENT),
        };
    }
    match share.attrs(dir) {
        Ok(attrs) if attrs.kind == Kind::Dir => {}
        Ok(_) => return mountres3::Err(mountstat3::MNT3ERR_NOTDIR),
        Err(_) => return mountres3::Err(mountstat3::MNT3ERR_NOENT),
    }
    mountres3::Ok(mountres3_ok {
        fhandle: fhandle3(handle(&share, dir).data),
        auth_flavors: vec![1, 0],
    })
}

fn handle(share: &Share, fileid: u64) -> nfs_fh3 {
    let mut data = Vec::with_capacity(25);
    data.push(HANDLE_VERSION);
    data.extend_from_slice(&hex::decode(&share.info().id).unwrap_or_default());
    data.extend_from_slice(&fileid.to_be_bytes());
    nfs_fh3 {
        data: Opaque::owned(data),
    }
}

/// The share and fileid a handle names.
fn resolve(
    server: &NfsServer,
    caller: Caller,
    fh: &nfs_fh3,
) -> Result<(Arc<Share>, u64), nfsstat3> {
    let data = &fh.data.0;
    if data.len() != 25 || data[0] != HANDLE_VERSION {
        return Err(nfsstat3::NFS3ERR_BADHANDLE);
    }
    let share = server
        .share_by_id(&data[1..17], caller.peer)
        .map_err(|e| match e {
            ShareAccess::Stale => nfsstat3::NFS3ERR_STALE,
            ShareAccess::Refused => nfsstat3::NFS3ERR_ACCES,
        })?;
    let fileid = u64::from_be_bytes(data[17..25].try_into().unwrap_or_default());
    // Until the share has caught up with a reopened metadata store, the client tries again.
    share
        .after_reopen()
        .map_err(|_| nfsstat3::NFS3ERR_JUKEBOX)?;
    Ok((share, fileid))
}

fn status(e: &ShareError) -> nfsstat3 {
    match e {
        ShareError::NotFound => nfsstat3::NFS3ERR_NOENT,
        ShareError::Stale(_) | ShareError::NoShare(_) => nfsstat3::NFS3ERR_STALE,
        ShareError::Exists | ShareError::ShareExists(_) => nfsstat3::NFS3ERR_EXIST,
        ShareError::NotDir => nfsstat3::NFS3ERR_NOTDIR,
        ShareError::IsDir => nfsstat3::NFS3ERR_ISDIR,
        ShareError::NotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        ShareError::NameTooLong(_) => nfsstat3::NFS3ERR_NAMETOOLONG,
        ShareError::Invalid(_) => nfsstat3::NFS3ERR_INVAL,
        ShareError::TooBig(_) => nfsstat3::NFS3ERR_FBIG,
        ShareError::ReadOnly => nfsstat3::NFS3ERR_ROFS,
        ShareError::NoSpace | ShareError::Stopping => nfsstat3::NFS3ERR_JUKEBOX,
        ShareError::Io(_) | ShareError::Changed(_) => nfsstat3::NFS3ERR_IO,
    }
}

fn time(ns: u64) -> nfstime3 {
    nfstime3 {
        seconds: (ns / 1_000_000_000).min(u32::MAX as u64) as u32,
        nseconds: (ns % 1_000_000_000) as u32,
    }
}

fn fattr(share: &Share, a: &Attrs) -> fattr3 {
    fattr3 {
        type_: match a.kind {
            Kind::File => ftype3::NF3REG,
            Kind::Dir => ftype3::NF3DIR,
            Kind::Symlink => ftype3::NF3LNK,
        },
        mode: a.mode,
        nlink: if a.kind == Kind::Dir { 2 } else { 1 },
        uid: a.uid,
        gid: a.gid,
        size: a.size,
        used: a.used,
        rdev: specdata3::default(),
        fsid: u64::from_str_radix(&share.info().id[..16], 16).unwrap_or_default(),
        fileid: a.fileid,
        atime: time(a.atime_ns),
        mtime: time(a.mtime_ns),
        ctime: time(a.ctime_ns),
    }
}

fn post_attr(share: &Share, fileid: u64) -> post_op_attr {
    share
        .attrs(fileid)
        .map_or(post_op_attr::None, |a| post_op_attr::Some(fattr(share, &a)))
}

fn wcc(share: &Share, fileid: u64) -> wcc_data {
    wcc_data {
        before: pre_op_attr::None,
        after: post_attr(share, fileid),
    }
}

/// A name from the wire: UTF-8 of at most `MAX_NAME` bytes.
fn name(raw: &filename3<'_>) -> Result<String, nfsstat3> {
    let bytes = raw.as_ref();
    if bytes.len() > MAX_NAME {
        return Err(nfsstat3::NFS3ERR_NAMETOOLONG);
    }
    String::from_utf8(bytes.to_vec()).map_err(|_| nfsstat3::NFS3ERR_INVAL)
}

/// Who owns what a caller creates: the caller, after the share's squashing.
fn owner(share: &Share, caller: Caller, attrs: &sattr3) -> (u32, u32, u32) {
    let who = who(share, &caller);
    let mode = match attrs.mode {
        Nfs3Option::Some(mode) => mode,
        Nfs3Option::None => 0o644,
    };
    (mode, who.uid, who.gid)
}

fn who(share: &Share, caller: &Caller) -> Who {
    Who::of(caller, share.info().squash)
}

/// The mode and owner of `id`, for a permission check.
fn target(share: &Share, id: u64) -> Result<Target, nfsstat3> {
    let inode = share.inode(id).map_err(|e| status(&e))?;
    Ok(Target {
        kind: inode.kind,
        mode: inode.mode,
        uid: inode.uid,
        gid: inode.gid,
    })
}

/// `NFS3ERR_ACCES` unless `allowed`.
fn permit(allowed: bool) -> Result<(), nfsstat3> {
    if allowed {
        Ok(())
    } else {
        Err(nfsstat3::NFS3ERR_ACCES)
    }
}

/// Whether `who` may make the changes in `set` to `target` (as chmod, chown, truncate and
/// utimes check them): `Err` with the status to answer if not.
fn may_set(
    who: &Who,
    target: &Target,
    set: &SetAttrs,
    to_server_time: bool,
) -> Result<(), nfsstat3> {
    let not_owner = || Err(nfsstat3::NFS3ERR_PERM);
    if set.mode.is_some() && !who.owns(target) {
        return not_owner();
    }
    if set.uid.is_some_and(|uid| uid != target.uid) && !who.is_root() {
        return not_owner();
    }
    if let Some(gid) = set.gid.filter(|&gid| gid != target.gid)
        && !(who.is_root() || who.uid == target.uid && who.in_group(gid))
    {
        return not_owner();
    }
    if set.size.is_some() {
        permit(who.may_use(target, perm::WRITE))?;
    }
    let times = set.atime_ns.is_some() || set.mtime_ns.is_some();
    if times && !who.owns(target) {
        // "Now" needs only write permission; a time of the caller's choosing, ownership.
        if to_server_time {
            permit(who.may(target, perm::WRITE))?;
        } else {
            return not_owner();
        }
    }
    Ok(())
}

fn set_attrs(attrs: &sattr3) -> SetAttrs {
    let now = crate::engines::share::now_ns();
    let at = |t: &nfstime3| t.seconds as u64 * 1_000_000_000 + t.nseconds as u64;
    SetAttrs {
        mode: match attrs.mode {
            Nfs3Option::Some(m) => Some(m),
            Nfs3Option::None => None,
        },
        uid: match attrs.uid {
            Nfs3Option::Some(u) => Some(u),
            Nfs3Option::None => None,
        },
        gid: match attrs.gid {
            Nfs3Option::Some(g) => Some(g),
            Nfs3Option::None => None,
        },
        size: match attrs.size {
            Nfs3Option::Some(s) => Some(s),
            Nfs3Option::None => None,
        },
        atime_ns: match &attrs.atime {
            set_atime::DONT_CHANGE => None,
            set_atime::SET_TO_SERVER_TIME => Some(now),
            set_atime::SET_TO_CLIENT_TIME(t) => Some(at(t)),
        },
        mtime_ns: match &attrs.mtime {
            set_mtime::DONT_CHANGE => None,
            set_mtime::SET_TO_SERVER_TIME => Some(now),
            set_mtime::SET_TO_CLIENT_TIME(t) => Some(at(t)),
        },
    }
}

fn is_set(attrs: &SetAttrs) -> bool {
    attrs.mode.is_some()
        || attrs.uid.is_some()
        || attrs.gid.is_some()
        || attrs.size.is_some()
        || attrs.atime_ns.is_some()
        || attrs.mtime_ns.is_some()
}

pub(super) fn nfs(server: &NfsServer, caller: Caller, proc: u32, args: &[u8]) -> Outcome {
    Ok(match proc {
        0 => Vec::new(),
        1 => getattr(server, caller, decode(args)?),
        2 => setattr(server, caller, decode(args)?),
        3 => lookup(server, caller, decode(args)?),
        4 => access(server, caller, decode(args)?),
        5 => readlink(server, caller, decode(args)?),
        6 => read(server, caller, decode(args)?),
        7 => write(server, caller, decode_write(args)?),
        8 => create(server, caller, decode(args)?),
        9 => mkdir(server, caller, decode(args)?),
        10 => symlink(server, caller, decode(args)?),
        // MKNOD: device nodes, sockets and FIFOs have no object to be.
        11 => encode(&MKNOD3res::Err((
            nfsstat3::NFS3ERR_NOTSUPP,
            MKNOD3resfail {
                dir_wcc: wcc_data::default(),
            },
        ))),
        12 => remove(server, caller, decode(args)?, false),
        13 => remove(server, caller, decode(args)?, true),
        14 => rename(server, caller, decode(args)?),
        // LINK: one object cannot have two names.
        15 => encode(&LINK3res::Err((
            nfsstat3::NFS3ERR_NOTSUPP,
            LINK3resfail {
                file_attributes: post_op_attr::None,
                linkdir_wcc: wcc_data::default(),
            },
        ))),
        16 => readdir(server, caller, decode(args)?),
        17 => readdirplus(server, caller, decode(args)?),
        18 => fsstat(server, caller, decode(args)?),
        19 => fsinfo(server, caller, decode(args)?),
        20 => pathconf(server, caller, decode(args)?),
        21 => commit(server, caller, decode(args)?),
        _ => return Err(accept_stat_data::PROC_UNAVAIL),
    })
}

fn getattr(server: &NfsServer, caller: Caller, args: GETATTR3args) -> Vec<u8> {
    let result = resolve(server, caller, &args.object).and_then(|(share, id)| {
        let attrs = share.attrs(id).map_err(|e| status(&e))?;
        Ok(GETATTR3resok {
            obj_attributes: fattr(&share, &attrs),
        })
    });
    encode(&match result {
        Ok(ok) => GETATTR3res::Ok(ok),
        Err(e) => GETATTR3res::Err((e, Void)),
    })
}

fn setattr(server: &NfsServer, caller: Caller, args: SETATTR3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.object).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                SETATTR3resfail {
                    obj_wcc: wcc(&share, id),
                },
            )
        };
        if let Nfs3Option::Some(guard) = &args.guard {
            let now = share.attrs(id).map_err(|e| fail(status(&e)))?;
            if time(now.ctime_ns) != *guard {
                return Err(fail(nfsstat3::NFS3ERR_NOT_SYNC));
            }
        }
        let set = set_attrs(&args.new_attributes);
        if is_set(&set) {
            let now_only = !matches!(args.new_attributes.atime, set_atime::SET_TO_CLIENT_TIME(_))
                && !matches!(args.new_attributes.mtime, set_mtime::SET_TO_CLIENT_TIME(_));
            let file = target(&share, id).map_err(fail)?;
            may_set(&who(&share, &caller), &file, &set, now_only).map_err(fail)?;
            share.setattr(id, set).map_err(|e| fail(status(&e)))?;
        }
        Ok(SETATTR3resok {
            obj_wcc: wcc(&share, id),
        })
    })();
    encode(&match result {
        Ok(ok) => SETATTR3res::Ok(ok),
        Err(e) => SETATTR3res::Err(e),
    })
}

/// `resolve` for procedures whose failures carry extra data: the status with a default.
trait OrDefault<T> {
    fn or_default_data<E: Default>(self) -> Result<T, (nfsstat3, E)>;
}

impl<T> OrDefault<T> for Result<T, nfsstat3> {
    fn or_default_data<E: Default>(self) -> Result<T, (nfsstat3, E)> {
        self.map_err(|e| (e, E::default()))
    }
}

fn lookup(server: &NfsServer, caller: Caller, args: LOOKUP3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.what.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                LOOKUP3resfail {
                    dir_attributes: post_attr(&share, dir),
                },
            )
        };
        let name = name(&args.what.name).map_err(fail)?;
        let searched = target(&share, dir).map_err(fail)?;
        if searched.kind == Kind::Dir {
            permit(who(&share, &caller).may(&searched, perm::EXEC)).map_err(fail)?;
        }
        let id = share.lookup(dir, &name).map_err(|e| fail(status(&e)))?;
        Ok(LOOKUP3resok {
            object: handle(&share, id),
            obj_attributes: post_attr(&share, id),
            dir_attributes: post_attr(&share, dir),
        })
    })();
    encode(&match result {
        Ok(ok) => LOOKUP3res::Ok(ok),
        Err(e) => LOOKUP3res::Err(e),
    })
}

fn access(server: &NfsServer, caller: Caller, args: ACCESS3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.object).or_default_data()?;
        let attrs = share
            .attrs(id)
            .map_err(|e| (status(&e), ACCESS3resfail::default()))?;
        // What the mode bits grant this caller; a read-only share grants no change.
        let who = who(&share, &caller);
        let file = target(&share, id).map_err(|e| (e, ACCESS3resfail::default()))?;
        let dir = file.kind == Kind::Dir;
        let mut allowed = 0;
        for (bit, granted) in [
            (ACCESS3_READ, who.may(&file, perm::READ)),
            (ACCESS3_LOOKUP, dir && who.may(&file, perm::EXEC)),
            (ACCESS3_MODIFY, who.may(&file, perm::WRITE)),
            (ACCESS3_EXTEND, who.may(&file, perm::WRITE)),
            (
                ACCESS3_DELETE,
                dir && who.may(&file, perm::WRITE | perm::EXEC),
            ),
            (ACCESS3_EXECUTE, !dir && who.may(&file, perm::EXEC)),
        ] {
            if granted {
                allowed |= bit;
            }
        }
        allowed &= args.access;
        if share.info().read_only {
            allowed &= !(ACCESS3_MODIFY | ACCESS3_EXTEND | ACCESS3_DELETE);
        }
        Ok(ACCESS3resok {
            obj_attributes: post_op_attr::Some(fattr(&share, &attrs)),
            access: allowed,
        })
    })();
    encode(&match result {
        Ok(ok) => ACCESS3res::Ok(ok),
        Err(e) => ACCESS3res::Err(e),
    })
}

fn readlink(server: &NfsServer, caller: Caller, args: READLINK3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.symlink).or_default_data()?;
        let target = share
            .readlink(id)
            .map_err(|e| (status(&e), READLINK3resfail::default()))?;
        Ok(READLINK3resok {
            symlink_attributes: post_attr(&share, id),
            data: nfspath3::from(target.into_bytes()),
        })
    })();
    encode(&match result {
        Ok(ok) => READLINK3res::Ok(ok),
        Err(e) => READLINK3res::Err(e),
    })
}

fn read(server: &NfsServer, caller: Caller, args: READ3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.file).or_default_data()?;
        let fail = |e: &ShareError| {
            (
                status(e),
                READ3resfail {
                    file_attributes: post_attr(&share, id),
                },
            )
        };
        let file = target(&share, id).map_err(|e| (e, READ3resfail::default()))?;
        permit(who(&share, &caller).may_use(&file, perm::READ))
            .map_err(|e| (e, READ3resfail::default()))?;
        let (data, eof) = share
            .read(id, args.offset, args.count.min(IO_MAX))
            .map_err(|e| fail(&e))?;
        Ok(READ3resok {
            file_attributes: post_attr(&share, id),
            count: data.len() as u32,
            eof,
            data: Opaque::owned(data),
        })
    })();
    encode(&match result {
        Ok(ok) => READ3res::Ok(ok),
        Err(e) => READ3res::Err(e),
    })
}

/// WRITE's arguments with the data borrowed from the request: the generic decoder would
/// zero a buffer and copy up to 1 MiB into it for every write.
fn decode_write(args: &[u8]) -> Result<WRITE3args<'_>, accept_stat_data> {
    use nfs3_types::xdr_codec::Unpack;
    let garbage = |_| accept_stat_data::GARBAGE_ARGS;
    let mut input = std::io::Cursor::new(args);
    let (file, _) = nfs_fh3::unpack(&mut input).map_err(garbage)?;
    let (offset, _) = u64::unpack(&mut input).map_err(garbage)?;
    let (count, _) = u32::unpack(&mut input).map_err(garbage)?;
    let (stable, _) = stable_how::unpack(&mut input).map_err(garbage)?;
    let (len, _) = u32::unpack(&mut input).map_err(garbage)?;
    let at = input.position() as usize;
    let data = args
        .get(at..at.saturating_add(len as usize))
        .ok_or(accept_stat_data::GARBAGE_ARGS)?;
    Ok(WRITE3args {
        file,
        offset,
        count,
        stable,
        data: Opaque(std::borrow::Cow::Borrowed(data)),
    })
}

fn write(server: &NfsServer, caller: Caller, args: WRITE3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.file).or_default_data()?;
        let fail = |e: &ShareError| {
            (
                status(e),
                WRITE3resfail {
                    file_wcc: wcc(&share, id),
                },
            )
        };
        let data = &args.data.0;
        if args.count as usize != data.len() {
            return Err((nfsstat3::NFS3ERR_INVAL, WRITE3resfail::default()));
        }
        let file = target(&share, id).map_err(|e| (e, WRITE3resfail::default()))?;
        permit(who(&share, &caller).may_use(&file, perm::WRITE))
            .map_err(|e| (e, WRITE3resfail::default()))?;
        let sync = !matches!(args.stable, stable_how::UNSTABLE);
        let written = share
            .write(id, args.offset, data, sync)
            .map_err(|e| fail(&e))?;
        Ok(WRITE3resok {
            // The attributes the write ended with: no second look at the file.
            file_wcc: wcc_data {
                before: pre_op_attr::None,
                after: post_op_attr::Some(fattr(&share, &written)),
            },
            count: args.count,
            committed: if sync {
                stable_how::FILE_SYNC
            } else {
                stable_how::UNSTABLE
            },
            verf: writeverf3(server.verifier),
        })
    })();
    encode(&match result {
        Ok(ok) => WRITE3res::Ok(ok),
        Err(e) => WRITE3res::Err(e),
    })
}

fn create(server: &NfsServer, caller: Caller, args: CREATE3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.where_.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                CREATE3resfail {
                    dir_wcc: wcc(&share, dir),
                },
            )
        };
        let name = name(&args.where_.name).map_err(fail)?;
        let (attrs, exclusive, then) = match &args.how {
            createhow3::UNCHECKED(a) => (a, false, set_attrs(a)),
            createhow3::GUARDED(a) => (a, true, set_attrs(a)),
            createhow3::EXCLUSIVE(_) => (&sattr3::default(), true, SetAttrs::default()),
        };
        let verifier = match &args.how {
            createhow3::EXCLUSIVE(verf) => Some(verifier_times(verf)),
            _ => None,
        };
        let (mode, uid, gid) = owner(&share, caller, attrs);
        let parent = target(&share, dir).map_err(fail)?;
        permit(who(&share, &caller).may(&parent, perm::WRITE | perm::EXEC)).map_err(fail)?;
        let made = match share.create(dir, &name, mode, uid, gid, exclusive) {
            Ok(made) => {
                if let Some((atime_ns, mtime_ns)) = verifier {
                    let times = SetAttrs {
                        atime_ns: Some(atime_ns),
                        mtime_ns: Some(mtime_ns),
                        ..SetAttrs::default()
                    };
                    share
                        .setattr(made.fileid, times)
                        .map_err(|e| fail(status(&e)))?;
                }
                made
            }
            // The same EXCLUSIVE create again (its reply was lost): the file it made.
            Err(ShareError::Exists) if verifier.is_some() => {
                let found = share
                    .lookup(dir, &name)
                    .and_then(|id| share.attrs(id))
                    .map_err(|e| fail(status(&e)))?;
                if found.kind != Kind::File || Some((found.atime_ns, found.mtime_ns)) != verifier {
                    return Err(fail(nfsstat3::NFS3ERR_EXIST));
                }
                found
            }
            Err(e) => return Err(fail(status(&e))),
        };
        let mut changed = verifier.is_some();
        // A size asked for at create (usually 0: truncate an existing file).
        if then.size.is_some() {
            changed = true;
            let file = target(&share, made.fileid).map_err(fail)?;
            permit(who(&share, &caller).may_use(&file, perm::WRITE)).map_err(fail)?;
            let only_size = SetAttrs {
                size: then.size,
                ..SetAttrs::default()
            };
            share
                .setattr(made.fileid, only_size)
                .map_err(|e| fail(status(&e)))?;
        }
        Ok(CREATE3resok {
            obj: post_op_fh3::Some(handle(&share, made.fileid)),
            // As made, unless times or a size were set on it since.
            obj_attributes: if changed {
                post_attr(&share, made.fileid)
            } else {
                post_op_attr::Some(fattr(&share, &made))
            },
            dir_wcc: wcc(&share, dir),
        })
    })();
    encode(&match result {
        Ok(ok) => CREATE3res::Ok(ok),
        Err(e) => CREATE3res::Err(e),
    })
}

/// Where an EXCLUSIVE create's verifier is kept, as other NFSv3 servers keep it: the new
/// file's access and modification times, whole seconds from each half. A retransmitted create
/// finds them and gets the file it made; any other finds EXIST. The client then sets the
/// file's real attributes (RFC 1813, 3.3.8), which replaces them.
fn verifier_times(verf: &createverf3) -> (u64, u64) {
    let [a0, a1, a2, a3, m0, m1, m2, m3] = verf.0;
    let seconds = |b: [u8; 4]| u64::from(u32::from_be_bytes(b)) * 1_000_000_000;
    (seconds([a0, a1, a2, a3]), seconds([m0, m1, m2, m3]))
}

fn mkdir(server: &NfsServer, caller: Caller, args: MKDIR3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.where_.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                MKDIR3resfail {
                    dir_wcc: wcc(&share, dir),
                },
            )
        };
        let name = name(&args.where_.name).map_err(fail)?;
        let (mut mode, uid, gid) = owner(&share, caller, &args.attributes);
        if matches!(args.attributes.mode, Nfs3Option::None) {
            mode = 0o755;
        }
        let parent = target(&share, dir).map_err(fail)?;
        permit(who(&share, &caller).may(&parent, perm::WRITE | perm::EXEC)).map_err(fail)?;
        let made = share
            .mkdir(dir, &name, mode, uid, gid)
            .map_err(|e| fail(status(&e)))?;
        Ok(MKDIR3resok {
            obj: post_op_fh3::Some(handle(&share, made.fileid)),
            obj_attributes: post_op_attr::Some(fattr(&share, &made)),
            dir_wcc: wcc(&share, dir),
        })
    })();
    encode(&match result {
        Ok(ok) => MKDIR3res::Ok(ok),
        Err(e) => MKDIR3res::Err(e),
    })
}

fn symlink(server: &NfsServer, caller: Caller, args: SYMLINK3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.where_.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                SYMLINK3resfail {
                    dir_wcc: wcc(&share, dir),
                },
            )
        };
        let name = name(&args.where_.name).map_err(fail)?;
        let link_to = std::str::from_utf8(args.symlink.symlink_data.as_ref())
            .map_err(|_| fail(nfsstat3::NFS3ERR_INVAL))?;
        let (_, uid, gid) = owner(&share, caller, &args.symlink.symlink_attributes);
        let parent = target(&share, dir).map_err(fail)?;
        permit(who(&share, &caller).may(&parent, perm::WRITE | perm::EXEC)).map_err(fail)?;
        let made = share
            .symlink(dir, &name, link_to, uid, gid)
            .map_err(|e| fail(status(&e)))?;
        Ok(SYMLINK3resok {
            obj: post_op_fh3::Some(handle(&share, made.fileid)),
            obj_attributes: post_op_attr::Some(fattr(&share, &made)),
            dir_wcc: wcc(&share, dir),
        })
    })();
    encode(&match result {
        Ok(ok) => SYMLINK3res::Ok(ok),
        Err(e) => SYMLINK3res::Err(e),
    })
}

fn remove(server: &NfsServer, caller: Caller, args: REMOVE3args, dir_wanted: bool) -> Vec<u8> {
    let result = (|| {
        let (share, dir) =
            resolve(server, caller, &args.object.dir).map_err(|e| (e, wcc_data::default()))?;
        let name = name(&args.object.name).map_err(|e| (e, wcc(&share, dir)))?;
        let allowed = (|| {
            let parent = target(&share, dir)?;
            let id = share.lookup(dir, &name).map_err(|e| status(&e))?;
            permit(who(&share, &caller).may_unlink(&parent, &target(&share, id)?))
        })();
        allowed.map_err(|e| (e, wcc(&share, dir)))?;
        let removed = if dir_wanted {
            share.rmdir(dir, &name)
        } else {
            share.remove(dir, &name)
        };
        removed.map_err(|e| (status(&e), wcc(&share, dir)))?;
        Ok(wcc(&share, dir))
    })();
    // REMOVE3res and RMDIR3res have one shape: a directory's wcc_data either way.
    if dir_wanted {
        encode(&match result {
            Ok(dir_wcc) => RMDIR3res::Ok(RMDIR3resok { dir_wcc }),
            Err((e, dir_wcc)) => RMDIR3res::Err((e, RMDIR3resfail { dir_wcc })),
        })
    } else {
        encode(&match result {
            Ok(dir_wcc) => REMOVE3res::Ok(REMOVE3resok { dir_wcc }),
            Err((e, dir_wcc)) => REMOVE3res::Err((e, REMOVE3resfail { dir_wcc })),
        })
    }
}

fn rename(server: &NfsServer, caller: Caller, args: RENAME3args) -> Vec<u8> {
    let result = (|| {
        let (share, from_dir) = resolve(server, caller, &args.from.dir).or_default_data()?;
        let (to_share, to_dir) = resolve(server, caller, &args.to.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                RENAME3resfail {
                    fromdir_wcc: wcc(&share, from_dir),
                    todir_wcc: wcc(&share, to_dir),
                },
            )
        };
        if share.info().id != to_share.info().id {
            return Err(fail(nfsstat3::NFS3ERR_XDEV));
        }
        let from = name(&args.from.name).map_err(fail)?;
        let to = name(&args.to.name).map_err(fail)?;
        let who = who(&share, &caller);
        let allowed = (|| {
            let (source_dir, target_dir) = (target(&share, from_dir)?, target(&share, to_dir)?);
            let moved = share.lookup(from_dir, &from).map_err(|e| status(&e))?;
            let moved = target(&share, moved)?;
            permit(who.may_unlink(&source_dir, &moved))?;
            permit(who.may(&target_dir, perm::WRITE | perm::EXEC))?;
            // A directory moved to another parent has its `..` changed: as on a local file
            // system, that takes write permission on the directory itself.
            if moved.kind == Kind::Dir && from_dir != to_dir {
                permit(who.may(&moved, perm::WRITE))?;
            }
            match share.lookup(to_dir, &to) {
                Ok(replaced) => permit(who.may_unlink(&target_dir, &target(&share, replaced)?)),
                Err(_) => Ok(()),
            }
        })();
        allowed.map_err(fail)?;
        share
            .rename(from_dir, &from, to_dir, &to)
            .map_err(|e| fail(status(&e)))?;
        Ok(RENAME3resok {
            fromdir_wcc: wcc(&share, from_dir),
            todir_wcc: wcc(&share, to_dir),
        })
    })();
    encode(&match result {
        Ok(ok) => RENAME3res::Ok(ok),
        Err(e) => RENAME3res::Err(e),
    })
}

/// The entries after `cookie` (the fileid of the last entry a client was given; 0 at the
/// start), as many as `count` bytes hold at `entry_size` each. `Err` for a cookie whose
/// entry is gone.
#[allow(clippy::type_complexity)]
fn entries(
    server: &NfsServer,
    share: &Share,
    dir: u64,
    cookie: u64,
    count: u32,
    entry_size: usize,
) -> Result<(Vec<(String, Attrs)>, bool), nfsstat3> {
    let share_id = &share.info().id;
    // After the name the cookie was given for (the entry may have been renamed or removed
    // since), else the entry's name now, if it is still in this directory: one that moved
    // elsewhere would lead the listing astray.
    let after = if cookie == 0 {
        None
    } else if let Some(name) = server.cookie_name(share_id, dir, cookie) {
        Some(name)
    } else {
        let path = share
            .path(cookie)
            .map_err(|_| nfsstat3::NFS3ERR_BAD_COOKIE)?;
        let dir_path = share.path(dir).map_err(|e| status(&e))?;
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", &path));
        if parent != dir_path {
            return Err(nfsstat3::NFS3ERR_BAD_COOKIE);
        }
        Some(name.to_string())
    };
    let listed = entries_after(share, dir, after, count, entry_size)?;
    server.remember_cookies(share_id, dir, &listed.0);
    Ok(listed)
}

fn entries_after(
    share: &Share,
    dir: u64,
    after: Option<String>,
    count: u32,
    entry_size: usize,
) -> Result<(Vec<(String, Attrs)>, bool), nfsstat3> {
    // The reply's fixed part takes about 120 bytes. A client's count is capped: one reply
    // lists at most about a megabyte of entries however many it asks for.
    let room = (count as usize).min(READDIR_MAX).saturating_sub(120);
    let mut taken = Vec::new();
    let mut used = 0;
    let mut after = after;
    loop {
        let page = share
            .list(dir, after.as_deref(), 256)
            .map_err(|e| status(&e))?;
        if page.is_empty() {
            return Ok((taken, true));
        }
        after = page.last().map(|(name, _)| name.clone());
        for (name, attrs) in page {
            let size = entry_size + name.len().div_ceil(4) * 4;
            if used + size > room {
                if taken.is_empty() {
                    return Err(nfsstat3::NFS3ERR_TOOSMALL);
                }
                return Ok((taken, false));
            }
            used += size;
            taken.push((name, attrs));
        }
    }
}

fn readdir(server: &NfsServer, caller: Caller, args: READDIR3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                READDIR3resfail {
                    dir_attributes: post_attr(&share, dir),
                },
            )
        };
        let listed = target(&share, dir).map_err(fail)?;
        permit(who(&share, &caller).may(&listed, perm::READ)).map_err(fail)?;
        let (list, eof) =
            entries(server, &share, dir, args.cookie, args.count, 24).map_err(fail)?;
        let entries = list
            .into_iter()
            .map(|(name, attrs)| entry3 {
                fileid: attrs.fileid,
                name: filename3::from(name.into_bytes()),
                cookie: attrs.fileid,
            })
            .collect();
        Ok(READDIR3resok {
            dir_attributes: post_attr(&share, dir),
            cookieverf: cookieverf3::default(),
            reply: dirlist3 {
                entries: List(entries),
                eof,
            },
        })
    })();
    encode(&match result {
        Ok(ok) => READDIR3res::Ok(ok),
        Err(e) => READDIR3res::Err(e),
    })
}

fn readdirplus(server: &NfsServer, caller: Caller, args: READDIRPLUS3args) -> Vec<u8> {
    let result = (|| {
        let (share, dir) = resolve(server, caller, &args.dir).or_default_data()?;
        let fail = |e: nfsstat3| {
            (
                e,
                READDIRPLUS3resfail {
                    dir_attributes: post_attr(&share, dir),
                },
            )
        };
        let listed = target(&share, dir).map_err(fail)?;
        permit(who(&share, &caller).may(&listed, perm::READ)).map_err(fail)?;
        let (list, eof) = entries(
            server,
            &share,
            dir,
            args.cookie,
            args.maxcount,
            24 + 88 + 36,
        )
        .map_err(fail)?;
        let entries = list
            .into_iter()
            .map(|(name, attrs)| entryplus3 {
                fileid: attrs.fileid,
                name: filename3::from(name.into_bytes()),
                cookie: attrs.fileid,
                name_attributes: post_op_attr::Some(fattr(&share, &attrs)),
                name_handle: post_op_fh3::Some(handle(&share, attrs.fileid)),
            })
            .collect();
        Ok(READDIRPLUS3resok {
            dir_attributes: post_attr(&share, dir),
            cookieverf: cookieverf3::default(),
            reply: dirlistplus3 {
                entries: List(entries),
                eof,
            },
        })
    })();
    encode(&match result {
        Ok(ok) => READDIRPLUS3res::Ok(ok),
        Err(e) => READDIRPLUS3res::Err(e),
    })
}

fn fsstat(server: &NfsServer, caller: Caller, args: FSSTAT3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.fsroot).or_default_data()?;
        let (total, free, files, free_files) = share.space();
        Ok(FSSTAT3resok {
            obj_attributes: post_attr(&share, id),
            tbytes: total,
            fbytes: free,
            abytes: free,
            tfiles: files,
            ffiles: free_files,
            afiles: free_files,
            invarsec: 0,
        })
    })();
    encode(&match result {
        Ok(ok) => FSSTAT3res::Ok(ok),
        Err(e) => FSSTAT3res::Err(e),
    })
}

fn fsinfo(server: &NfsServer, caller: Caller, args: FSINFO3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.fsroot).or_default_data()?;
        Ok(FSINFO3resok {
            obj_attributes: post_attr(&share, id),
            rtmax: IO_MAX,
            rtpref: IO_MAX,
            rtmult: 4096,
            wtmax: IO_MAX,
            wtpref: IO_MAX,
            wtmult: 4096,
            dtpref: 64 << 10,
            maxfilesize: share.max_file(),
            time_delta: nfstime3 {
                seconds: 0,
                nseconds: 1,
            },
            properties: FSF3_SYMLINK | FSF3_HOMOGENEOUS | FSF3_CANSETTIME,
        })
    })();
    encode(&match result {
        Ok(ok) => FSINFO3res::Ok(ok),
        Err(e) => FSINFO3res::Err(e),
    })
}

fn pathconf(server: &NfsServer, caller: Caller, args: PATHCONF3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.object).or_default_data()?;
        Ok(PATHCONF3resok {
            obj_attributes: post_attr(&share, id),
            linkmax: 1,
            name_max: MAX_NAME as u32,
            no_trunc: true,
            chown_restricted: true,
            case_insensitive: false,
            case_preserving: true,
        })
    })();
    encode(&match result {
        Ok(ok) => PATHCONF3res::Ok(ok),
        Err(e) => PATHCONF3res::Err(e),
    })
}

fn commit(server: &NfsServer, caller: Caller, args: COMMIT3args) -> Vec<u8> {
    let result = (|| {
        let (share, id) = resolve(server, caller, &args.file).map_err(|e| {
            (
                e,
                COMMIT3resfail {
                    file_wcc: wcc_data::default(),
                },
            )
        })?;
        let committed = share.commit(id).map_err(|e| {
            (
                status(&e),
                COMMIT3resfail {
                    file_wcc: wcc(&share, id),
                },
            )
        })?;
        Ok(COMMIT3resok {
            file_wcc: wcc_data {
                before: pre_op_attr::None,
                after: post_op_attr::Some(fattr(&share, &committed)),
            },
            verf: writeverf3(server.verifier),
        })
    })();
    encode(&match result {
        Ok(ok) => COMMIT3res::Ok(ok),
        Err(e) => COMMIT3res::Err(e),
    })
}
