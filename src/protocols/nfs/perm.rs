//! Permission checks for NFS calls: POSIX mode bits against the caller's AUTH_UNIX identity,
//! after the share's squashing, as a kernel NFS server applies them. The exceptions are the
//! usual ones: root passes every check except execute on a file no one may execute, and the
//! owner of a file may read and write it whatever its mode (a client that made a file
//! read-only must still write what it opened for writing, as `cp -p` does).

use crate::engines::share::Squash;
use crate::engines::share::namespace::Kind;

use super::{Caller, NOBODY};

pub const READ: u32 = 4;
pub const WRITE: u32 = 2;
pub const EXEC: u32 = 1;

/// What a check needs of a file: its kind, permission bits and owner.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub kind: Kind,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Whom a call acts as on a share.
#[derive(Debug, Clone, Copy)]
pub struct Who {
    pub uid: u32,
    pub gid: u32,
    groups: [u32; 16],
    group_count: usize,
}

impl Who {
    /// The caller after `squash`: everyone becomes nobody, or (as a kernel NFS server's
    /// `root_squash` does) user 0 and group 0 do, the supplementary group 0 included: a
    /// caller claiming group 0 must not get root's group rights (nor make files of it).
    pub fn of(caller: &Caller, squash: Squash) -> Who {
        match squash {
            Squash::All => Who {
                uid: NOBODY,
                gid: NOBODY,
                groups: [0; 16],
                group_count: 0,
            },
            Squash::Root => {
                let anon = |id: u32| if id == 0 { NOBODY } else { id };
                let mut groups = caller.groups;
                groups[..caller.group_count]
                    .iter_mut()
                    .for_each(|g| *g = anon(*g));
                Who {
                    uid: anon(caller.uid),
                    gid: anon(caller.gid),
                    groups,
                    group_count: caller.group_count,
                }
            }
            Squash::None => Who {
                uid: caller.uid,
                gid: caller.gid,
                groups: caller.groups,
                group_count: caller.group_count,
            },
        }
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    pub fn in_group(&self, gid: u32) -> bool {
        self.gid == gid || self.groups[..self.group_count].contains(&gid)
    }

    /// Whether the mode bits grant every permission in `want` (`READ | WRITE | EXEC`).
    pub fn may(&self, target: &Target, want: u32) -> bool {
        if self.is_root() {
            return want & EXEC == 0 || target.kind == Kind::Dir || target.mode & 0o111 != 0;
        }
        let bits = if self.uid == target.uid {
            target.mode >> 6
        } else if self.in_group(target.gid) {
            target.mode >> 3
        } else {
            target.mode
        } & 7;
        bits & want == want
    }

    /// Reading or writing a file's content: the mode, or owning it.
    pub fn may_use(&self, target: &Target, want: u32) -> bool {
        self.uid == target.uid || self.may(target, want)
    }

    /// Whether the caller may change the mode or times of `target`: its owner, or root.
    pub fn owns(&self, target: &Target) -> bool {
        self.is_root() || self.uid == target.uid
    }

    /// Removing or renaming entry `entry` of `dir`: write and search on the directory, and
    /// where the directory is sticky (`o+t`, like `/tmp`), owning the entry or the directory.
    pub fn may_unlink(&self, dir: &Target, entry: &Target) -> bool {
        self.may(dir, WRITE | EXEC)
            && (dir.mode & 0o1000 == 0 || self.owns(entry) || self.owns(dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, gid: u32, groups: &[u32]) -> Caller {
        let mut all = [0; 16];
        all[..groups.len()].copy_from_slice(groups);
        Caller {
            peer: std::net::Ipv4Addr::LOCALHOST.into(),
            uid,
            gid,
            groups: all,
            group_count: groups.len(),
        }
    }

    fn file(mode: u32, uid: u32, gid: u32) -> Target {
        Target {
            kind: Kind::File,
            mode,
            uid,
            gid,
        }
    }

    #[test]
    fn owner_group_and_others_get_their_own_bits() {
        let f = file(0o640, 1000, 100);
        let owner = Who::of(&caller(1000, 1, &[]), Squash::None);
        let member = Who::of(&caller(2000, 2, &[7, 100]), Squash::None);
        let other = Who::of(&caller(3000, 3, &[]), Squash::None);
        assert!(owner.may(&f, READ | WRITE) && !owner.may(&f, EXEC));
        assert!(member.may(&f, READ) && !member.may(&f, WRITE));
        assert!(!other.may(&f, READ));
        // The owner's bits decide for the owner, even where the group's would allow more.
        assert!(!owner.may(&file(0o070, 1000, 1), READ));
        // Content: the owner may always, others by the mode.
        assert!(owner.may_use(&file(0o444, 1000, 1), WRITE));
        assert!(!member.may_use(&f, WRITE));
    }

    #[test]
    fn root_passes_but_squashed_root_is_nobody() {
        let f = file(0o600, 1000, 100);
        let root = Who::of(&caller(0, 0, &[]), Squash::None);
        assert!(root.may(&f, READ | WRITE));
        assert!(!root.may(&f, EXEC), "no execute bit anywhere");
        assert!(root.may(&file(0o100, 1000, 100), EXEC));
        let squashed = Who::of(&caller(0, 0, &[]), Squash::Root);
        assert!(!squashed.may(&f, READ));
        assert!(squashed.may(&file(0o666, 1000, 100), WRITE));
        // Group 0, claimed as the primary group or a supplementary one, is squashed too.
        let root_group = file(0o660, 0, 0);
        assert!(Who::of(&caller(1000, 0, &[]), Squash::None).may(&root_group, WRITE));
        for claimed in [caller(1000, 0, &[]), caller(1000, 100, &[0])] {
            let who = Who::of(&claimed, Squash::Root);
            assert_eq!(who.uid, 1000);
            assert!(!who.in_group(0), "{claimed:?} keeps group 0");
            assert!(!who.may(&root_group, READ));
        }
        let kept = Who::of(&caller(1000, 100, &[0, 20]), Squash::Root);
        assert!(kept.in_group(100) && kept.in_group(20));
        let all = Who::of(&caller(1000, 100, &[]), Squash::All);
        assert_eq!((all.uid, all.gid), (NOBODY, NOBODY));
        assert!(!all.may(&f, READ));
    }

    #[test]
    fn a_sticky_directory_keeps_others_from_removing_entries() {
        let dir = Target {
            kind: Kind::Dir,
            mode: 0o1777,
            uid: 0,
            gid: 0,
        };
        let theirs = file(0o644, 1000, 100);
        let owner = Who::of(&caller(1000, 100, &[]), Squash::None);
        let other = Who::of(&caller(2000, 100, &[]), Squash::None);
        assert!(owner.may_unlink(&dir, &theirs));
        assert!(!other.may_unlink(&dir, &theirs));
        let open = Target { mode: 0o777, ..dir };
        assert!(other.may_unlink(&open, &theirs));
    }
}
