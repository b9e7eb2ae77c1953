//! A table of records sorted by a two-word key, held in memory up to a budget and spilled past
//! it to sorted run files, then read back merged: the overlap table of a volume scored in 3-D,
//! whose pairs grow with the number of objects, in bounded memory.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use crate::error::file_error;
use crate::Result;

/// `[key0, key1, count, extra]`: sorted by `(key0, key1)`; equal keys are one record whose
/// count is the sum (the extra word is taken from the first).
pub(crate) type Record = [u64; 4];

const RECORD_BYTES: usize = 32;

/// Runs merged into one when this many are written, so that few files are open at once.
const MAX_RUNS: usize = 64;

pub(crate) struct PairTable {
    dir: Option<tempfile::TempDir>,
    parent: PathBuf,
    budget: usize,
    buf: Vec<Record>,
    runs: Vec<PathBuf>,
    written: usize,
}

impl PairTable {
    /// A table that holds at most `budget` records (at least 2) in memory and writes its runs
    /// into a fresh folder under `parent`, removed when the table is dropped.
    pub(crate) fn new(budget: usize, parent: &Path) -> PairTable {
        PairTable {
            dir: None,
            parent: parent.to_path_buf(),
            budget: budget.max(2),
            buf: Vec::new(),
            runs: Vec::new(),
            written: 0,
        }
    }

    /// Run files written so far (merged ones included).
    pub(crate) fn runs_written(&self) -> usize {
        self.written
    }

    pub(crate) fn push(&mut self, record: Record) -> Result<()> {
        self.buf.push(record);
        if self.buf.len() >= self.budget {
            compact(&mut self.buf);
            // Spill unless summing equal keys freed half the room.
            if self.buf.len() > self.budget / 2 {
                self.spill()?;
            }
        }
        Ok(())
    }

    fn spill(&mut self) -> Result<()> {
        let dir = match &self.dir {
            Some(d) => d.path().to_path_buf(),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("vimseg-pairs-")
                    .tempdir_in(&self.parent)
                    .map_err(file_error(&self.parent))?;
                let path = d.path().to_path_buf();
                self.dir = Some(d);
                path
            }
        };
        let path = self.next_run(&dir);
        write_run(&path, self.buf.iter().copied().map(Ok))?;
        self.buf.clear();
        self.runs.push(path);
        if self.runs.len() >= MAX_RUNS {
            let runs = std::mem::take(&mut self.runs);
            let path = self.next_run(&dir);
            write_run(&path, merged(open_runs(&runs)?))?;
            for r in &runs {
                std::fs::remove_file(r).map_err(file_error(r))?;
            }
            self.runs.push(path);
        }
        Ok(())
    }

    fn next_run(&mut self, dir: &Path) -> PathBuf {
        self.written += 1;
        dir.join(format!("run-{:06}.bin", self.written))
    }

    /// Calls `f(record, total, first)` for every record once per key, ascending, counts
    /// summed, where `total` is the summed count of all records with the same `key0` and
    /// `first` marks the first record of that group. Holds no group in memory: the records are
    /// read twice, the first reader summing a group ahead of the second.
    pub(crate) fn for_each_with_group_total(
        &mut self,
        mut f: impl FnMut(Record, u64, bool) -> Result<()>,
    ) -> Result<()> {
        compact(&mut self.buf);
        let mut lead = self.sorted()?.peekable();
        let mut lag = self.sorted()?;
        while let Some(first) = lead.next() {
            let first = first?;
            let (mut total, mut count) = (first[2], 1usize);
            while let Some(next) = lead.next_if(|r| r.as_ref().map_or(true, |r| r[0] == first[0])) {
                total += next?[2];
                count += 1;
            }
            for i in 0..count {
                let r = lag.next().expect("the second reader follows the first")?;
                f(r, total, i == 0)?;
            }
        }
        Ok(())
    }

    /// The records once per key, ascending, counts summed (after [`compact`]).
    fn sorted(&self) -> Result<impl Iterator<Item = Result<Record>> + '_> {
        let mut sources = open_runs(&self.runs)?;
        sources.push(Source::Memory(self.buf.iter()));
        Ok(merged(sources))
    }
}

fn key(r: &Record) -> (u64, u64) {
    (r[0], r[1])
}

/// Sorts and sums equal keys in place.
fn compact(buf: &mut Vec<Record>) {
    buf.sort_unstable_by_key(key);
    let mut out = 0usize;
    for i in 0..buf.len() {
        if out > 0 && key(&buf[out - 1]) == key(&buf[i]) {
            buf[out - 1][2] += buf[i][2];
        } else {
            buf[out] = buf[i];
            out += 1;
        }
    }
    buf.truncate(out);
}

fn write_run(path: &Path, records: impl Iterator<Item = Result<Record>>) -> Result<()> {
    let file = File::create(path).map_err(file_error(path))?;
    let mut w = BufWriter::with_capacity(1 << 16, file);
    for r in records {
        let mut bytes = [0u8; RECORD_BYTES];
        for (chunk, word) in bytes.chunks_exact_mut(8).zip(r?) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        w.write_all(&bytes).map_err(file_error(path))?;
    }
    w.flush().map_err(file_error(path))
}

enum Source<'a> {
    File(BufReader<File>, PathBuf),
    Memory(std::slice::Iter<'a, Record>),
}

impl Source<'_> {
    fn next(&mut self) -> Result<Option<Record>> {
        match self {
            Source::Memory(it) => Ok(it.next().copied()),
            Source::File(r, path) => {
                let mut bytes = [0u8; RECORD_BYTES];
                match r.read_exact(&mut bytes) {
                    Ok(()) => {
                        let mut rec = [0u64; 4];
                        for (word, chunk) in rec.iter_mut().zip(bytes.chunks_exact(8)) {
                            *word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
                        }
                        Ok(Some(rec))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(file_error(path)(e)),
                }
            }
        }
    }
}

fn open_runs<'a>(runs: &[PathBuf]) -> Result<Vec<Source<'a>>> {
    runs.iter()
        .map(|p| {
            let f = File::open(p).map_err(file_error(p))?;
            Ok(Source::File(
                BufReader::with_capacity(1 << 16, f),
                p.clone(),
            ))
        })
        .collect()
}

/// A k-way merge of sorted sources, equal keys summed.
fn merged<'a>(mut sources: Vec<Source<'a>>) -> impl Iterator<Item = Result<Record>> + 'a {
    let mut heap: BinaryHeap<Reverse<(Record, usize)>> = BinaryHeap::new();
    let mut failed: Option<crate::Error> = None;
    for (i, s) in sources.iter_mut().enumerate() {
        match s.next() {
            Ok(Some(r)) => heap.push(Reverse((r, i))),
            Ok(None) => {}
            Err(e) => failed = failed.or(Some(e)),
        }
    }
    let mut pending: Option<Record> = None;
    std::iter::from_fn(move || {
        if let Some(e) = failed.take() {
            return Some(Err(e));
        }
        loop {
            let Some(Reverse((r, i))) = heap.pop() else {
                return pending.take().map(Ok);
            };
            match sources[i].next() {
                Ok(Some(next)) => heap.push(Reverse((next, i))),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            match &mut pending {
                Some(p) if key(p) == key(&r) => p[2] += r[2],
                _ => {
                    if let Some(done) = pending.replace(r) {
                        return Some(Ok(done));
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Many records with repeated keys through a small budget: the same sums as a map, in key
    /// order, with runs written and merged, and the folder removed afterwards.
    #[test]
    fn spilled_records_merge_to_the_sums() {
        let parent = tempfile::tempdir().unwrap();
        for budget in [2, 7, 100, 100_000] {
            let mut table = PairTable::new(budget, parent.path());
            let mut want: BTreeMap<(u64, u64), u64> = BTreeMap::new();
            let mut state = 12345u64;
            for _ in 0..5000 {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
                let (a, b, n) = ((state >> 60) % 13, (state >> 40) % 29, (state >> 20) % 100);
                table.push([a, b, n, a * 7]).unwrap();
                *want.entry((a, b)).or_default() += n;
            }
            let runs = table.runs_written();
            let mut got = Vec::new();
            table
                .for_each_with_group_total(|r, total, first| {
                    got.push((r, total, first));
                    Ok(())
                })
                .unwrap();
            let total = |a: u64| want.iter().filter(|(k, _)| k.0 == a).map(|(_, n)| n).sum();
            let want: Vec<(Record, u64, bool)> = want
                .iter()
                .enumerate()
                .map(|(i, (&(a, b), &n))| {
                    let first = i == 0 || want.keys().nth(i - 1).unwrap().0 != a;
                    ([a, b, n, a * 7], total(a), first)
                })
                .collect();
            assert_eq!(got, want, "budget {budget}");
            drop(table);
            if budget <= 7 {
                // 13 × 29 keys do not fit: runs were written, and merged past MAX_RUNS.
                assert!(runs > MAX_RUNS, "budget {budget}: {runs} runs");
            } else if budget == 100_000 {
                assert_eq!(runs, 0);
            }
        }
        assert_eq!(std::fs::read_dir(parent.path()).unwrap().count(), 0);
    }
}
