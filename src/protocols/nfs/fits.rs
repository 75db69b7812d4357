//! Checks, before `nfs3_types` decodes a call, that every variable-length field the call
//! declares fits in the bytes that follow it and within the protocol's limits. The decoder
//! allocates a field's declared length before it reads the field, so a 4-byte length of
//! 4 GiB in a 100-byte call would reserve 4 GiB (16 GiB for a list of group ids): on a
//! gateway with less memory, an abort. This walk reads lengths only, allocates nothing, and
//! lets anything it passes through to the decoder, which still checks everything else.

/// RFC 5531: a credential or verifier body holds at most 400 bytes.
const MAX_AUTH: usize = 400;
/// RFC 1813: an NFSv3 file handle holds at most 64 bytes.
const MAX_FH: usize = 64;

/// A cursor over XDR that only moves: `None` as soon as something does not fit.
struct Walk<'a>(&'a [u8]);

impl Walk<'_> {
    fn skip(&mut self, n: usize) -> Option<()> {
        self.0 = self.0.get(n..)?;
        Some(())
    }

    fn u32(&mut self) -> Option<u32> {
        let (word, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*word))
    }

    /// An opaque or a string of at most `max` bytes, padded to four.
    fn opaque(&mut self, max: usize) -> Option<()> {
        let len = self.u32()? as usize;
        if len > max {
            return None;
        }
        self.skip(len.div_ceil(4) * 4)
    }

    /// Any opaque that fits in what is left.
    fn bytes(&mut self) -> Option<()> {
        self.opaque(usize::MAX)
    }

    /// An optional value (`bool`, then the value when true).
    fn optional(&mut self, value: impl FnOnce(&mut Self) -> Option<()>) -> Option<()> {
        match self.u32()? {
            0 => Some(()),
            1 => value(self),
            _ => None,
        }
    }

    fn fh(&mut self) -> Option<()> {
        self.opaque(MAX_FH)
    }

    fn diropargs(&mut self) -> Option<()> {
        self.fh()?;
        self.bytes()
    }

    /// `sattr3`: mode, uid, gid, size, atime, mtime.
    fn sattr(&mut self) -> Option<()> {
        for _ in 0..3 {
            self.optional(|w| w.skip(4))?;
        }
        self.optional(|w| w.skip(8))?;
        for _ in 0..2 {
            match self.u32()? {
                0 | 1 => {}
                2 => self.skip(8)?,
                _ => return None,
            }
        }
        Some(())
    }
}

/// Whether the message is a call (a reply's layout differs, and its decoder trusts the
/// lengths in it) whose credential and verifier (the bytes from its start) declare lengths
/// that fit, and an AUTH_UNIX credential's name and group list too.
pub fn call_header(request: &[u8]) -> bool {
    let walk = || {
        let mut w = Walk(request);
        // xid, message type (0, a call), RPC version, program, version, procedure.
        w.skip(4)?;
        if w.u32()? != 0 {
            return None;
        }
        w.skip(16)?;
        let flavor = w.u32()?;
        let len = w.u32()? as usize;
        if len > MAX_AUTH {
            return None;
        }
        let body = w.0.get(..len)?;
        w.skip(len.div_ceil(4) * 4)?;
        // AUTH_UNIX: stamp, machine name (255 bytes at most), uid, gid, 16 groups at most.
        if flavor == 1 {
            let mut cred = Walk(body);
            cred.skip(4)?;
            cred.opaque(255)?;
            cred.skip(8)?;
            let groups = cred.u32()? as usize;
            if groups > 16 {
                return None;
            }
            cred.skip(groups * 4)?;
        }
        w.skip(4)?;
        w.opaque(MAX_AUTH)
    };
    walk().is_some()
}

/// Whether the arguments of NFSv3 procedure `proc` declare lengths that fit. Procedures
/// whose arguments firn never decodes (NULL, MKNOD, LINK, unknown ones) pass.
pub fn nfs_args(proc: u32, args: &[u8]) -> bool {
    let mut w = Walk(args);
    let walked = match proc {
        // GETATTR, ACCESS, READLINK, READ, FSSTAT, FSINFO, PATHCONF, COMMIT: a handle, then
        // fixed-size fields.
        1 | 4 | 5 | 6 | 18 | 19 | 20 | 21 => w.fh(),
        // SETATTR
        2 => w.fh().and_then(|()| w.sattr()),
        // LOOKUP, REMOVE, RMDIR
        3 | 12 | 13 => w.diropargs(),
        // WRITE: handle, offset, count, stability, data.
        7 => w.fh().and_then(|()| w.skip(16)).and_then(|()| w.bytes()),
        // CREATE: where, then how (UNCHECKED or GUARDED with attributes, EXCLUSIVE with a
        // verifier).
        8 => w.diropargs().and_then(|()| match w.u32()? {
            0 | 1 => w.sattr(),
            2 => w.skip(8),
            _ => None,
        }),
        // MKDIR
        9 => w.diropargs().and_then(|()| w.sattr()),
        // SYMLINK: where, attributes, target.
        10 => w
            .diropargs()
            .and_then(|()| w.sattr())
            .and_then(|()| w.bytes()),
        // RENAME
        14 => w.diropargs().and_then(|()| w.diropargs()),
        // READDIR, READDIRPLUS
        16 | 17 => w.fh(),
        _ => Some(()),
    };
    walked.is_some()
}

/// Whether the arguments of MOUNT procedure `proc` fit: MNT and UMNT take a path of at
/// most 1024 bytes (RFC 1813's MNTPATHLEN).
pub fn mount_args(proc: u32, args: &[u8]) -> bool {
    match proc {
        1 | 3 => Walk(args).opaque(1024).is_some(),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word(v: u32) -> [u8; 4] {
        v.to_be_bytes()
    }

    /// A call header with an AUTH_UNIX credential of `groups` group ids (claimed) and
    /// `present` of them present.
    fn header(groups: u32, present: usize, name_len: u32) -> Vec<u8> {
        let mut cred = Vec::new();
        cred.extend(word(1)); // stamp
        cred.extend(word(name_len));
        cred.extend(vec![b'h'; (name_len as usize).min(8).div_ceil(4) * 4]);
        cred.extend(word(1000));
        cred.extend(word(1000));
        cred.extend(word(groups));
        for g in 0..present {
            cred.extend(word(g as u32));
        }
        let mut call = Vec::new();
        for v in [7, 0, 2, 100003, 3, 1, 1] {
            call.extend(word(v));
        }
        call.extend(word(cred.len() as u32));
        call.extend(cred);
        call.extend(word(0));
        call.extend(word(0));
        call
    }

    #[test]
    fn honest_headers_pass_and_inflated_lengths_do_not() {
        assert!(call_header(&header(2, 2, 4)));
        assert!(!call_header(&header(u32::MAX, 2, 4)), "4 billion groups");
        assert!(!call_header(&header(17, 17, 4)), "more than 16 groups");
        assert!(
            !call_header(&header(1, 1, u32::MAX)),
            "a 4 GiB machine name"
        );
        let mut huge_cred = header(1, 1, 4);
        huge_cred[28..32].copy_from_slice(&word(u32::MAX));
        assert!(!call_header(&huge_cred));
        assert!(!call_header(&header(1, 1, 4)[..30]), "cut short");
        // A reply (message type 1) whose verifier would claim 4 GiB in a call's layout.
        let mut reply = header(2, 2, 4);
        reply[4..8].copy_from_slice(&word(1));
        assert!(!call_header(&reply), "a reply");
        reply[16..20].copy_from_slice(&word(u32::MAX));
        assert!(!call_header(&reply), "a reply with a huge verifier");
    }

    #[test]
    fn arguments_must_fit_in_the_call() {
        let fh = |len: u32| {
            let mut v = word(len).to_vec();
            v.extend(vec![0; len as usize]);
            v
        };
        // WRITE of 8 bytes, then one that claims 4 GiB.
        let mut write = fh(25);
        write.extend([0; 3]); // padding of the 25-byte handle
        write.extend([0; 16]);
        write.extend(word(8));
        write.extend([1; 8]);
        assert!(nfs_args(7, &write));
        let n = write.len();
        write[n - 12..n - 8].copy_from_slice(&word(u32::MAX));
        assert!(!nfs_args(7, &write));
        // A handle over 64 bytes; a LOOKUP whose name claims more than is there.
        assert!(!nfs_args(1, &fh(65)));
        let mut lookup = fh(8);
        lookup.extend(word(1 << 30));
        lookup.extend(b"name");
        assert!(!nfs_args(3, &lookup));
        // MNT of a path over MNTPATHLEN.
        let mut path = word(2000).to_vec();
        path.extend(vec![b'/'; 2000]);
        assert!(!mount_args(1, &path));
        assert!(mount_args(1, &[0, 0, 0, 1, b'/', 0, 0, 0]));
    }
}
