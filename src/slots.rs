//! A small record kept in two checksummed slots of one file, overwritten in place.
//!
//! Replacing a file (temporary file, fsync, rename, fsync of the directory) dirties a new inode,
//! the directory and the allocation bitmaps besides the data: 8 to 16 KiB of writes for a record
//! of a few hundred bytes, several times a run. Here the file keeps its blocks: slot 0 is the
//! page at offset 0, slot 1 the page at 4096, each a header (magic, generation, length,
//! checksum) and the payload. A write goes to the slot that does not hold the newest durable
//! record, so a write torn by a power loss leaves the other slot, the previous record, intact;
//! the reader takes the valid slot of the highest generation.
//!
//! A write may be left unsynced (the mark made before a part is sent): a killed process's
//! page-cache write survives it, only a host crash can lose it, and the next write, synced,
//! goes into the same slot, so the run still ends with one synced page. Each slot is written as
//! one whole, aligned page: a larger write would make the page cache hold both slots in one
//! large folio, and then every write would dirty both pages.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// The size of a slot: one page.
pub const SLOT: usize = 4096;
/// The length of a file of two slots.
pub const FILE_LEN: u64 = 2 * SLOT as u64;
const MAGIC: &[u8; 8] = b"GAREC\x001\n";
const HEADER: usize = 32;
/// The longest payload a slot holds.
pub const ROOM: usize = SLOT - HEADER;
/// Generations from here on are damage: one write a second would take 2.9e11 years to reach it,
/// so only a damaged or crafted slot holds one, and below it `generation + 1` cannot wrap.
const GENERATION_LIMIT: u64 = 1 << 63;

/// FNV-1a, 64 bits: enough to tell a torn or damaged slot from a whole one (not an adversary:
/// the state directory is the agent's own).
fn checksum(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// One slot's page: header and payload, zero padded.
fn page(generation: u64, payload: &[u8]) -> Vec<u8> {
    debug_assert!(payload.len() <= ROOM);
    let mut page = vec![0u8; SLOT];
    let gen = generation.to_le_bytes();
    let len = (payload.len() as u32).to_le_bytes();
    page[..8].copy_from_slice(MAGIC);
    page[8..16].copy_from_slice(&gen);
    page[16..20].copy_from_slice(&len);
    let sum = checksum(&[MAGIC, &gen, &len, payload]);
    page[24..32].copy_from_slice(&sum.to_le_bytes());
    page[HEADER..HEADER + payload.len()].copy_from_slice(payload);
    page
}

/// The generation and payload of a slot's bytes, when they are a whole slot.
fn parse(bytes: &[u8]) -> Option<(u64, &[u8])> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        return None;
    }
    let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
    let generation = word(8);
    let len = u32::from_le_bytes(bytes[16..20].try_into().unwrap()) as usize;
    if generation >= GENERATION_LIMIT
        || len > ROOM
        || HEADER + len > bytes.len()
        || bytes[20..24] != [0; 4]
    {
        return None;
    }
    let payload = &bytes[HEADER..HEADER + len];
    (checksum(&[MAGIC, &bytes[8..16], &bytes[16..20], payload]) == word(24))
        .then_some((generation, payload))
}

/// What the two slots of a file hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Slots {
    /// The newest whole slot: its index, generation and payload.
    pub newest: Option<(usize, u64, Vec<u8>)>,
    /// The other slot, when it is whole too (the record before the newest).
    pub older: Option<(usize, u64, Vec<u8>)>,
    /// The highest generation of a whole slot.
    pub generation: u64,
    /// Slots whose bytes are not a whole record (torn, damaged, or never written).
    pub damaged: usize,
}

impl Slots {
    /// Reads both slots of `file` (a short file has fewer; bytes past the two are ignored).
    pub fn read(file: &File) -> io::Result<Slots> {
        let mut slots = Slots::default();
        let mut buf = vec![0u8; SLOT];
        for index in 0..2 {
            let got = read_at_most(file, &mut buf, (index * SLOT) as u64)?;
            match parse(&buf[..got]) {
                Some((generation, payload)) => {
                    let slot = Some((index, generation, payload.to_vec()));
                    if slots.newest.as_ref().is_none_or(|n| generation > n.1) {
                        slots.older = std::mem::replace(&mut slots.newest, slot);
                    } else {
                        slots.older = slot;
                    }
                    slots.generation = slots.generation.max(generation);
                }
                None => slots.damaged += 1,
            }
        }
        Ok(slots)
    }

    /// Takes the older whole slot as the newest (whose payload the caller could not use): it
    /// is the one kept while the next write overwrites the other. The highest generation stays,
    /// so that write is the newest. False when there is no older whole slot.
    pub fn fall_back(&mut self) -> bool {
        match self.older.take() {
            Some(older) => {
                self.newest = Some(older);
                true
            }
            None => false,
        }
    }
}

fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// A slot file open for writing.
#[derive(Debug)]
pub struct SlotFile {
    file: File,
    /// The slot holding the newest durable record; the other one may be overwritten.
    durable: Option<usize>,
    generation: u64,
    /// A write was made since the last sync.
    unsynced: bool,
}

impl SlotFile {
    /// Takes over `file`, whose slots were read as `slots`: their newest record is made
    /// durable first (a killed run may have left it in the page cache only), so it can be the
    /// one kept while the other slot is overwritten.
    /// A file of another length is made two slots long first: a short one is filled with
    /// zeros written (not extended into a hole, which would leave later writes to allocate
    /// blocks and fail on a full disk), a long one cut.
    pub fn open(file: File, slots: &Slots) -> io::Result<SlotFile> {
        let len = file.metadata()?.len();
        if len > FILE_LEN {
            file.set_len(FILE_LEN)?;
        }
        let zeros = vec![0u8; SLOT];
        for start in [0, SLOT as u64] {
            // Page by page: see the module's comment on large folios.
            let end = start + SLOT as u64;
            if len < end {
                let from = len.max(start);
                file.write_all_at(&zeros[..(end - from) as usize], from)?;
            }
        }
        file.sync_data()?;
        Ok(SlotFile {
            file,
            durable: slots.newest.as_ref().map(|n| n.0),
            generation: slots.generation,
            unsynced: false,
        })
    }

    /// Lays out a new, empty file: both slots written (zeros), so their blocks are allocated
    /// and later writes overwrite them in place, and synced.
    pub fn format(file: File) -> io::Result<SlotFile> {
        let zeros = vec![0u8; SLOT];
        // One page at a time: see the module's comment on large folios.
        file.write_all_at(&zeros, 0)?;
        file.write_all_at(&zeros, SLOT as u64)?;
        file.sync_all()?;
        Ok(SlotFile {
            file,
            durable: None,
            generation: 0,
            unsynced: false,
        })
    }

    /// Writes `payload` (at most [`ROOM`] bytes) as the newest record; with `sync`, durable
    /// when this returns. The slot of the newest durable record is never the one written.
    pub fn write(&mut self, payload: &[u8], sync: bool) -> io::Result<()> {
        if payload.len() > ROOM {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a record of {} bytes does not fit a slot", payload.len()),
            ));
        }
        let slot = self.durable.map_or(0, |d| 1 - d);
        let Some(generation) = self
            .generation
            .checked_add(1)
            .filter(|g| *g < GENERATION_LIMIT)
        else {
            return self.renumber(payload);
        };
        self.generation = generation;
        self.file
            .write_all_at(&page(self.generation, payload), (slot * SLOT) as u64)?;
        self.unsynced = true;
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Writes `payload` as generation 1 into the free slot and then as generation 2 over the
    /// other, both synced: the way back from the highest generation. Until the second write is
    /// whole the old slot stays the newest, after it the new record is in both.
    fn renumber(&mut self, payload: &[u8]) -> io::Result<()> {
        let free = self.durable.map_or(0, |d| 1 - d);
        for (generation, slot) in [(1, free), (2, 1 - free)] {
            self.file
                .write_all_at(&page(generation, payload), (slot * SLOT) as u64)?;
            self.file.sync_data()?;
        }
        self.generation = 2;
        self.durable = Some(1 - free);
        self.unsynced = false;
        Ok(())
    }

    /// Makes the last write durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
            self.durable = Some(self.durable.map_or(0, |d| 1 - d));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;
    use std::path::PathBuf;

    fn temp(tag: &str) -> (PathBuf, File) {
        let path = std::env::temp_dir().join(format!("ga-slots-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (path, file)
    }

    fn newest(file: &File) -> Option<(usize, u64, String)> {
        Slots::read(file)
            .unwrap()
            .newest
            .map(|(i, g, p)| (i, g, String::from_utf8(p).unwrap()))
    }

    #[test]
    fn writes_alternate_between_slots_and_the_newest_generation_is_read() {
        let (path, file) = temp("alternate");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        assert_eq!(Slots::read(&file).unwrap().damaged, 2);
        assert_eq!(newest(&file), None);
        w.write(b"one", true).unwrap();
        assert_eq!(newest(&file), Some((0, 1, "one".into())));
        w.write(b"two", true).unwrap();
        assert_eq!(newest(&file), Some((1, 2, "two".into())));
        w.write(b"three", true).unwrap();
        assert_eq!(newest(&file), Some((0, 3, "three".into())));
        assert_eq!(file.metadata().unwrap().len(), FILE_LEN);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn an_unsynced_write_is_overwritten_by_the_next_and_never_replaces_the_durable_slot() {
        let (path, file) = temp("unsynced");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        w.write(b"accepted", true).unwrap();
        w.write(b"in flight", false).unwrap();
        // A killed process's write is in the page cache: the next run reads it.
        assert_eq!(newest(&file), Some((1, 2, "in flight".into())));
        w.write(b"outcome", true).unwrap();
        assert_eq!(newest(&file), Some((1, 3, "outcome".into())));
        let mut slot0 = vec![0u8; SLOT];
        file.read_exact_at(&mut slot0, 0).unwrap();
        assert_eq!(parse(&slot0), Some((1, &b"accepted"[..])));
        // The next write goes to the older slot again.
        w.write(b"next", true).unwrap();
        assert_eq!(newest(&file), Some((0, 4, "next".into())));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_torn_slot_leaves_the_other_one_and_is_the_next_written() {
        let (path, file) = temp("torn");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        w.write(b"old", true).unwrap();
        w.write(b"new record", true).unwrap();
        // A power loss tore the write of slot 1: its second half is still the old bytes.
        file.write_all_at(&[0xAA; 2048], (SLOT + 2048) as u64)
            .unwrap();
        file.write_all_at(b"X", (SLOT + HEADER + 2) as u64).unwrap();
        let slots = Slots::read(&file).unwrap();
        assert_eq!(
            (slots.newest.clone(), slots.generation, slots.damaged),
            (Some((0, 1, b"old".to_vec())), 1, 1)
        );
        let mut w = SlotFile::open(file.try_clone().unwrap(), &slots).unwrap();
        w.write(b"after", true).unwrap();
        assert_eq!(newest(&file), Some((1, 2, "after".into())));
        // Both slots garbage: no record.
        file.write_all_at(&[7; SLOT * 2], 0).unwrap();
        let slots = Slots::read(&file).unwrap();
        assert_eq!((slots.newest, slots.damaged), (None, 2));
        std::fs::remove_file(path).unwrap();
    }

    /// Slot `index` of `file` rewritten with `generation` and `payload`, checksum and all.
    fn plant(file: &File, index: usize, generation: u64, payload: &[u8]) {
        file.write_all_at(&page(generation, payload), (index * SLOT) as u64)
            .unwrap();
    }

    #[test]
    fn a_generation_of_2_63_or_more_is_damage_and_the_highest_valid_one_is_renumbered() {
        let (path, file) = temp("generation");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        w.write(b"real", true).unwrap();
        // A whole slot claiming the highest generation would stay the newest for ever.
        plant(&file, 1, u64::MAX, b"crafted");
        let slots = Slots::read(&file).unwrap();
        assert_eq!(
            (slots.newest.clone(), slots.older.clone(), slots.damaged),
            (Some((0, 1, b"real".to_vec())), None, 1)
        );
        // The highest generation below the limit: the next write cannot add one.
        plant(&file, 1, GENERATION_LIMIT - 1, b"last");
        let slots = Slots::read(&file).unwrap();
        assert_eq!(slots.generation, GENERATION_LIMIT - 1);
        let mut w2 = SlotFile::open(file.try_clone().unwrap(), &slots).unwrap();
        w2.write(b"after", true).unwrap();
        assert_eq!(newest(&file), Some((1, 2, "after".into())));
        let slots = Slots::read(&file).unwrap();
        assert_eq!(slots.older, Some((0, 1, b"after".to_vec())));
        w2.write(b"next", false).unwrap();
        assert_eq!(newest(&file), Some((0, 3, "next".into())));
        drop(w);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn the_older_whole_slot_can_be_taken_and_the_next_write_goes_over_the_newest() {
        let (path, file) = temp("fallback");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        w.write(b"good", true).unwrap();
        w.write(b"unusable", true).unwrap();
        let mut slots = Slots::read(&file).unwrap();
        assert_eq!(slots.older, Some((0, 1, b"good".to_vec())));
        assert!(slots.fall_back());
        assert_eq!(
            (slots.newest.clone(), slots.older.clone(), slots.generation),
            (Some((0, 1, b"good".to_vec())), None, 2)
        );
        assert!(!slots.fall_back());
        let mut w = SlotFile::open(file.try_clone().unwrap(), &slots).unwrap();
        w.write(b"fixed", true).unwrap();
        assert_eq!(newest(&file), Some((1, 3, "fixed".into())));
        let slots = Slots::read(&file).unwrap();
        assert_eq!(slots.older, Some((0, 1, b"good".to_vec())));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_short_file_is_filled_to_two_allocated_slots_and_a_long_one_cut() {
        use std::os::unix::fs::MetadataExt;
        for len in [0, 100, SLOT as u64 + 7, FILE_LEN + 3 * SLOT as u64] {
            let (path, file) = temp(&format!("len{len}"));
            let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
            w.write(b"kept", true).unwrap();
            file.set_len(len).unwrap();
            let slots = Slots::read(&file).unwrap();
            let mut w = SlotFile::open(file.try_clone().unwrap(), &slots).unwrap();
            let meta = file.metadata().unwrap();
            assert_eq!(
                (meta.len(), meta.blocks() * 512 >= FILE_LEN),
                (FILE_LEN, true),
                "length {len}"
            );
            let kept = (len >= (HEADER + 4) as u64).then(|| (0, 1, "kept".to_string()));
            assert_eq!(newest(&file), kept, "length {len}");
            w.write(b"next", true).unwrap();
            assert_eq!(newest(&file).map(|n| n.2), Some("next".into()));
            std::fs::remove_file(path).unwrap();
        }
    }

    #[test]
    fn short_long_and_oversized_inputs_are_judged_without_panicking() {
        let (path, file) = temp("short");
        let mut w = SlotFile::format(file.try_clone().unwrap()).unwrap();
        w.write(b"kept", true).unwrap();
        file.set_len(100).unwrap();
        assert_eq!(newest(&file), Some((0, 1, "kept".into())));
        file.set_len(20).unwrap();
        assert_eq!(newest(&file), None);
        // A length past the slot is damage, not a read past the page.
        let mut bad = page(5, b"x");
        bad[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&bad), None);
        assert!(w.write(&vec![b'y'; ROOM + 1], true).is_err());
        w.write(&vec![b'y'; ROOM], true).unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
