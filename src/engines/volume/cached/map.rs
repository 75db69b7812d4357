//! The cached volume's map: which bytes of the volume live where.
//!
//! A sorted set of non-overlapping pieces keyed by their first byte. A piece is either zeros
//! (a trim or an all-zero write: a record with no data) or a stretch of one log record's data.
//! Bytes no piece covers were never written and read as zeros. A write replaces whatever it
//! covers, splitting the pieces at its ends, so the map always says what the newest record of
//! each byte is: the map is updated in log order, under the log's lock.
//!
//! Memory is one B-tree entry per piece, 32 bytes (`Packed`), about 45 with the nodes'
//! slack: it grows with the number of distinct writes that are still live, not with the
//! volume's size. docs/format.md ("Memory") has the figures and the limit.

use std::collections::BTreeMap;

/// Where a piece's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Reads as zeros.
    Zero,
    /// Reads as zeros, but was written as zeros without leave to unmap
    /// (NBD_CMD_FLAG_NO_HOLE): block status calls it data.
    ZeroData,
    /// In the data of the record whose header is at byte `pos` of segment `segment`; the
    /// record holds `rec_len` bytes and this piece starts `skip` bytes into them.
    Data {
        segment: u64,
        pos: u32,
        rec_len: u32,
        skip: u32,
    },
}

impl Place {
    /// The object (segment or chunk number) holding the bytes, if any does.
    pub fn object(self) -> Option<u64> {
        match self {
            Place::Data { segment, .. } => Some(segment),
            Place::Zero | Place::ZeroData => None,
        }
    }

    /// The same place moved `by` bytes further into its record.
    fn advanced(self, by: u64) -> Place {
        match self {
            Place::Zero | Place::ZeroData => self,
            Place::Data {
                segment,
                pos,
                rec_len,
                skip,
            } => Place::Data {
                segment,
                pos,
                rec_len,
                skip: skip + by as u32,
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub len: u64,
    pub place: Place,
}

/// A stretch of a lookup's answer: `len` bytes at `offset`, at `place` (`None`: never written).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub offset: u64,
    pub len: u64,
    pub place: Option<Place>,
}

/// A piece as the map keeps it: 24 bytes rather than `Piece`'s 32, which makes a B-tree
/// entry 32 bytes instead of 40. The segment number says the kind (two numbers no segment or
/// chunk gets mark zeros); a data piece's length fits in 32 bits, a zero piece's is kept in
/// the fields a data piece uses for its record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Packed {
    segment: u64,
    pos: u32,
    rec_len: u32,
    skip: u32,
    len: u32,
}

const ZERO: u64 = u64::MAX;
const ZERO_DATA: u64 = u64::MAX - 1;
const _: () = assert!(std::mem::size_of::<Packed>() == 24);

/// The highest segment or chunk number a data piece may name (higher ones mark zeros).
pub const MAX_OBJECT: u64 = ZERO_DATA - 1;

impl Packed {
    fn new(len: u64, place: Place) -> Packed {
        let zeros = |segment| Packed {
            segment,
            pos: (len >> 32) as u32,
            rec_len: len as u32,
            skip: 0,
            len: 0,
        };
        match place {
            Place::Zero => zeros(ZERO),
            Place::ZeroData => zeros(ZERO_DATA),
            Place::Data {
                segment,
                pos,
                rec_len,
                skip,
            } => {
                debug_assert!(segment < ZERO_DATA && len <= u64::from(u32::MAX));
                Packed {
                    segment,
                    pos,
                    rec_len,
                    skip,
                    len: len as u32,
                }
            }
        }
    }

    fn len(&self) -> u64 {
        match self.segment {
            ZERO | ZERO_DATA => u64::from(self.pos) << 32 | u64::from(self.rec_len),
            _ => u64::from(self.len),
        }
    }

    fn place(&self) -> Place {
        match self.segment {
            ZERO => Place::Zero,
            ZERO_DATA => Place::ZeroData,
            segment => Place::Data {
                segment,
                pos: self.pos,
                rec_len: self.rec_len,
                skip: self.skip,
            },
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Map {
    pieces: BTreeMap<u64, Packed>,
}

impl Map {
    pub fn new() -> Map {
        Map::default()
    }

    pub fn len(&self) -> usize {
        self.pieces.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty()
    }

    /// Every piece in order, as (offset, piece).
    pub fn iter(&self) -> impl Iterator<Item = (u64, Piece)> + '_ {
        self.pieces.iter().map(|(&offset, piece)| {
            (
                offset,
                Piece {
                    len: piece.len(),
                    place: piece.place(),
                },
            )
        })
    }

    /// Makes `offset..offset + len` read from `place`, replacing what was there.
    pub fn insert(&mut self, offset: u64, len: u64, place: Place) {
        if len == 0 {
            return;
        }
        // A data piece's length is kept in 32 bits (a record holds less); longer ones, which
        // no record makes, are split rather than cut short.
        if let Place::Data { .. } = place
            && len > u64::from(u32::MAX)
        {
            let first = u64::from(u32::MAX);
            self.insert(offset, first, place);
            self.insert(offset + first, len - first, place.advanced(first));
            return;
        }
        let end = offset + len;
        self.cut_out(offset, end);
        // Neighbouring zeros merge, so repeated trims keep the map small.
        if place == Place::Zero {
            let mut start = offset;
            let mut stop = end;
            if let Some((&before, piece)) = self.pieces.range(..offset).next_back()
                && piece.place() == Place::Zero
                && before + piece.len() == offset
            {
                start = before;
                self.pieces.remove(&before);
            }
            if let Some(piece) = self.pieces.get(&end)
                && piece.place() == Place::Zero
            {
                stop = end + piece.len();
                self.pieces.remove(&end);
            }
            self.pieces
                .insert(start, Packed::new(stop - start, Place::Zero));
            return;
        }
        self.pieces.insert(offset, Packed::new(len, place));
    }

    /// Removes every byte of `start..end` from the map, splitting pieces at the ends.
    fn cut_out(&mut self, start: u64, end: u64) {
        // A piece that begins before `start` and reaches into the range.
        if let Some((&before, &piece)) = self.pieces.range(..start).next_back()
            && before + piece.len() > start
        {
            let piece_end = before + piece.len();
            self.pieces
                .insert(before, Packed::new(start - before, piece.place()));
            if piece_end > end {
                self.pieces.insert(
                    end,
                    Packed::new(piece_end - end, piece.place().advanced(end - before)),
                );
                return;
            }
        }
        // Pieces that begin inside the range: dropped, the last one's tail kept. (One at a
        // time rather than collected first: a write usually covers one piece or none, and
        // this runs for every write, under the log's lock.)
        while let Some((&offset, &piece)) = self.pieces.range(start..end).next() {
            self.pieces.remove(&offset);
            let piece_end = offset + piece.len();
            if piece_end > end {
                self.pieces.insert(
                    end,
                    Packed::new(piece_end - end, piece.place().advanced(end - offset)),
                );
            }
        }
    }

    /// What covers `offset..offset + len`, in order, without gaps.
    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Span> {
        self.lookup_at_most(offset, len, usize::MAX)
    }

    /// `lookup`, of no more than the first `most` spans of the range (whose length then
    /// falls short of `len`): memory and time bounded however many pieces the range holds.
    pub fn lookup_at_most(&self, offset: u64, len: u64, most: usize) -> Vec<Span> {
        let end = offset + len;
        let mut spans = Vec::new();
        let mut at = offset;
        let first = self
            .pieces
            .range(..=offset)
            .next_back()
            .filter(|(o, p)| **o + p.len() > offset)
            .map(|(o, _)| *o)
            .unwrap_or(offset);
        for (&start, piece) in self.pieces.range(first..end) {
            if spans.len() >= most {
                return spans;
            }
            let piece_end = start + piece.len();
            if start > at {
                spans.push(Span {
                    offset: at,
                    len: start - at,
                    place: None,
                });
                at = start;
            }
            let stop = piece_end.min(end);
            if stop > at && spans.len() < most {
                spans.push(Span {
                    offset: at,
                    len: stop - at,
                    place: Some(piece.place().advanced(at - start)),
                });
                at = stop;
            }
        }
        if at < end && spans.len() < most {
            spans.push(Span {
                offset: at,
                len: end - at,
                place: None,
            });
        }
        spans
    }

    /// Makes the bytes of `offset..offset + len` that still read from `old` (advanced as
    /// the range is) read from `new` instead, the same way; bytes that were written over
    /// since stay as they are. Garbage collection moves live data with it. The bytes moved.
    pub fn replace_if(&mut self, offset: u64, len: u64, old: Place, new: Place) -> u64 {
        let mut moved = 0;
        for span in self.lookup(offset, len) {
            let by = span.offset - offset;
            if span.place == Some(old.advanced(by)) {
                self.insert(span.offset, span.len, new.advanced(by));
                moved += span.len;
            }
        }
        moved
    }

    /// Drops everything at or past `size` (a volume never shrinks; used when loading).
    pub fn truncate(&mut self, size: u64) {
        self.cut_out(size, u64::MAX);
    }
}

/// Builds a map from pieces given in order (a checkpoint's), with full B-tree nodes: inserted
/// one by one in order, they would leave each node about half full, which for a map of a
/// million pieces was 30 MiB more.
#[derive(Default)]
pub struct Sorted {
    pieces: Vec<(u64, Packed)>,
    end: u64,
}

impl Sorted {
    pub fn with_capacity(pieces: usize) -> Sorted {
        Sorted {
            pieces: Vec::with_capacity(pieces),
            end: 0,
        }
    }

    /// Adds the next piece; `None` if it is empty, or begins before the last one ended.
    pub fn push(&mut self, offset: u64, len: u64, place: Place) -> Option<()> {
        if len == 0 || offset < self.end {
            return None;
        }
        self.end = offset.checked_add(len)?;
        let mut at = 0;
        while at < len {
            // Split where a data piece's 32 bits end, as `Map::insert` does.
            let part = match place {
                Place::Data { .. } => (len - at).min(u64::from(u32::MAX)),
                Place::Zero | Place::ZeroData => len - at,
            };
            self.pieces
                .push((offset + at, Packed::new(part, place.advanced(at))));
            at += part;
        }
        Some(())
    }

    pub fn finish(self) -> Map {
        // From keys already in order, the B-tree is built bottom up with full nodes.
        Map {
            pieces: self.pieces.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The model: one tag per byte. 0 = never written, 1 = zero, n + 2 = record n's data at
    /// skip (encoded as n * 1000 + skip).
    fn apply(model: &mut [u64], offset: u64, len: u64, place: Place) {
        for i in 0..len {
            model[(offset + i) as usize] = match place {
                Place::Zero | Place::ZeroData => 1,
                Place::Data { segment, skip, .. } => 2 + segment * 1000 + skip as u64 + i,
            };
        }
    }

    fn read(map: &Map, offset: u64, len: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let spans = map.lookup(offset, len);
        let mut at = offset;
        for span in spans {
            assert_eq!(span.offset, at, "gap or overlap in {:?}", map);
            at += span.len;
            for i in 0..span.len {
                out.push(match span.place {
                    None => 0,
                    Some(Place::Zero | Place::ZeroData) => 1,
                    Some(Place::Data { segment, skip, .. }) => 2 + segment * 1000 + skip as u64 + i,
                });
            }
        }
        assert_eq!(at, offset + len);
        out
    }

    proptest! {
        #[test]
        fn the_map_answers_as_a_byte_model_does(
            ops in prop::collection::vec((0u64..200, 1u64..60, any::<bool>()), 1..60),
            probes in prop::collection::vec((0u64..250, 1u64..60), 1..10),
        ) {
            let size = 260;
            let mut model = vec![0u64; size + 60];
            let mut map = Map::new();
            for (n, &(offset, len, zero)) in ops.iter().enumerate() {
                let place = if zero {
                    Place::Zero
                } else {
                    Place::Data { segment: n as u64 + 1, pos: 0, rec_len: len as u32, skip: 0 }
                };
                map.insert(offset, len, place);
                apply(&mut model, offset, len, place);
            }
            for (offset, len) in probes {
                prop_assert_eq!(read(&map, offset, len), model[offset as usize..(offset + len) as usize].to_vec());
                // At most a few spans: the first ones of the whole answer, end to end.
                let all = map.lookup(offset, len);
                for most in [1, 2, 3] {
                    let some = map.lookup_at_most(offset, len, most);
                    prop_assert_eq!(&some[..], &all[..most.min(all.len())]);
                }
            }
            // Pieces never overlap and zeros next to zeros are merged.
            let pieces: Vec<_> = map.iter().collect();
            for pair in pieces.windows(2) {
                prop_assert!(pair[0].0 + pair[0].1.len <= pair[1].0);
                if pair[0].1.place == Place::Zero && pair[1].1.place == Place::Zero {
                    prop_assert!(pair[0].0 + pair[0].1.len < pair[1].0);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn moving_data_keeps_what_was_written_over(
            ops in prop::collection::vec((0u64..200, 1u64..60), 1..30),
            moved in 0usize..30,
            later in prop::collection::vec((0u64..200, 1u64..60), 0..5),
        ) {
            let mut map = Map::new();
            for (n, &(offset, len)) in ops.iter().enumerate() {
                map.insert(offset, len, Place::Data { segment: n as u64 + 1, pos: 0, rec_len: len as u32, skip: 0 });
            }
            let pieces: Vec<_> = map.iter().filter(|(_, p)| p.place.object() == Some(moved as u64 + 1)).collect();
            for (offset, len) in later.iter().copied() {
                map.insert(offset, len, Place::Zero);
            }
            let mut model = vec![0u64; 260];
            for (offset, piece) in map.iter() {
                apply(&mut model, offset, piece.len, piece.place);
            }
            for (offset, piece) in pieces {
                let new = Place::Data { segment: 900, pos: 0, rec_len: piece.len as u32, skip: 0 };
                map.replace_if(offset, piece.len, piece.place, new);
                for i in 0..piece.len {
                    let at = (offset + i) as usize;
                    // Still the moved record's byte: now the new place's, else unchanged.
                    if model[at] == 2 + (moved as u64 + 1) * 1000 + match piece.place { Place::Data { skip, .. } => skip as u64, _ => 0 } + i {
                        model[at] = 2 + 900 * 1000 + i;
                    }
                }
            }
            prop_assert_eq!(read(&map, 0, 260), model);
        }
    }

    #[test]
    fn zero_pieces_of_terabytes_and_data_pieces_past_4_gib_keep_their_lengths() {
        let tib = 1u64 << 40;
        let mut map = Map::new();
        map.insert(0, 2 * tib, Place::Zero);
        map.insert(2 * tib, 3 * tib + 5, Place::ZeroData);
        let data = Place::Data {
            segment: MAX_OBJECT,
            pos: 7,
            rec_len: u32::MAX,
            skip: 0,
        };
        let long = (5u64 << 30) + 3;
        map.insert(6 * tib, long, data);
        let pieces: Vec<_> = map.iter().collect();
        assert_eq!(
            pieces[0],
            (
                0,
                Piece {
                    len: 2 * tib,
                    place: Place::Zero
                }
            )
        );
        assert_eq!(
            pieces[1],
            (
                2 * tib,
                Piece {
                    len: 3 * tib + 5,
                    place: Place::ZeroData
                }
            )
        );
        // The long one is split where 32 bits end, its second part further into the record.
        assert_eq!(pieces.len(), 4);
        assert_eq!(pieces[2].1.len + pieces[3].1.len, long);
        assert_eq!(pieces[3].1.place, data.advanced(pieces[2].1.len));
        let spans = map.lookup(6 * tib + 10, long - 20);
        assert_eq!(spans.iter().map(|s| s.len).sum::<u64>(), long - 20);
        assert_eq!(spans[0].place, Some(data.advanced(10)));
    }

    #[test]
    fn a_map_built_from_sorted_pieces_equals_one_inserted_and_refuses_disorder() {
        let mut inserted = Map::new();
        let mut sorted = Sorted::default();
        for n in 0..10_000u64 {
            let place = match n % 3 {
                0 => Place::Zero,
                1 => Place::ZeroData,
                _ => Place::Data {
                    segment: n,
                    pos: n as u32,
                    rec_len: 9000,
                    skip: 3,
                },
            };
            inserted.insert(n * 20_000, 4096 + n, place);
            sorted.push(n * 20_000, 4096 + n, place).unwrap();
        }
        assert_eq!(sorted.finish(), inserted);
        let zero = Place::Zero;
        let mut overlapping = Sorted::default();
        overlapping.push(100, 50, zero).unwrap();
        assert_eq!(overlapping.push(149, 10, zero), None);
        assert_eq!(overlapping.push(50, 10, zero), None);
        assert_eq!(overlapping.push(150, 0, zero), None);
        assert_eq!(overlapping.push(u64::MAX - 5, 10, zero), None);
        assert_eq!(overlapping.push(150, 10, zero), Some(()));
    }

    #[test]
    fn trimming_everything_leaves_one_piece() {
        let mut map = Map::new();
        for i in 0..100 {
            map.insert(
                i * 8192,
                4096,
                Place::Data {
                    segment: 1,
                    pos: i as u32 * 4200,
                    rec_len: 4096,
                    skip: 0,
                },
            );
        }
        map.insert(0, 1 << 41, Place::Zero);
        assert_eq!(map.len(), 1);
    }
}
