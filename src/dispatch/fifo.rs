//! A first-in first-out queue kept in chunks of a fixed size, for the
//! batches an API's lane holds while they wait for its gate. A backlog of
//! single-account `follow_delete` batches puts some 200,000 of them here; in
//! one `VecDeque` every growth copied the lot into an allocation an eighth
//! larger while the old one was still held (two copies of up to 14 MiB at
//! once). In chunks, the queue grows and shrinks a chunk at a time and
//! nothing is ever copied: section 7d's peak RSS (AMD EPYC) went from
//! 96.7 MiB in two full runs of the bench to 87.7 in the full run after
//! this change (90.0 in an `--only external` run).

use std::collections::VecDeque;

/// Items per chunk: 1,024 batches of 72 bytes are 72 KiB.
const CHUNK: usize = 1024;

pub(super) struct Fifo<T> {
    chunks: VecDeque<VecDeque<T>>,
}

impl<T> Default for Fifo<T> {
    fn default() -> Self {
        Fifo {
            chunks: VecDeque::new(),
        }
    }
}

impl<T> Fifo<T> {
    pub(super) fn push_back(&mut self, item: T) {
        match self.chunks.back_mut() {
            Some(last) if last.len() < CHUNK => last.push_back(item),
            _ => {
                let mut chunk = VecDeque::with_capacity(CHUNK);
                chunk.push_back(item);
                self.chunks.push_back(chunk);
            }
        }
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        let first = self.chunks.front_mut()?;
        let item = first.pop_front();
        // A chunk is only ever filled at the back, so an emptied front
        // chunk is done with and its memory goes back at once, unless it is
        // the last: a lane that keeps going empty (no backlog) would
        // otherwise take and give back a chunk for each batch.
        if first.is_empty() && self.chunks.len() > 1 {
            self.chunks.pop_front();
        }
        item
    }

    /// Only the front chunk can be empty, and only when it is the one left.
    pub(super) fn is_empty(&self) -> bool {
        self.chunks.front().is_none_or(VecDeque::is_empty)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.chunks.iter().map(VecDeque::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn items_come_out_in_the_order_they_went_in_across_chunks() {
        let mut q = Fifo::default();
        assert!(q.is_empty());
        for i in 0..(3 * CHUNK + 7) {
            q.push_back(i);
        }
        assert_eq!(q.chunks.len(), 4);
        for i in 0..(3 * CHUNK + 7) {
            assert_eq!(q.pop_front(), Some(i));
        }
        assert_eq!(q.pop_front(), None);
        assert!(q.is_empty());
        assert_eq!(q.chunks.len(), 1, "emptied chunks are let go but the last");
        // The chunk kept is used again.
        q.push_back(1);
        assert_eq!(q.chunks.len(), 1);
        assert_eq!(q.pop_front(), Some(1));
    }

    #[test]
    fn a_drained_backlog_keeps_no_chunk_behind() {
        let mut q = Fifo::default();
        for i in 0..(10 * CHUNK) {
            q.push_back(i);
        }
        for _ in 0..(9 * CHUNK + 1) {
            q.pop_front();
        }
        // One chunk left, partly taken; none of the drained ones.
        assert_eq!(q.chunks.len(), 1);
        assert_eq!(q.len(), CHUNK - 1);
    }

    proptest! {
        /// Any mix of pushes and pops behaves as a `VecDeque` does.
        #[test]
        fn behaves_as_a_vecdeque(ops in proptest::collection::vec(any::<Option<u16>>(), 0..5000)) {
            let mut q = Fifo::default();
            let mut model = VecDeque::new();
            for op in ops {
                match op {
                    Some(v) => {
                        // Runs of pushes, so that chunks fill.
                        for k in 0..(v % 700) {
                            q.push_back((v, k));
                            model.push_back((v, k));
                        }
                    }
                    None => prop_assert_eq!(q.pop_front(), model.pop_front()),
                }
                prop_assert_eq!(q.is_empty(), model.is_empty());
                prop_assert_eq!(q.len(), model.len());
            }
        }
    }
}
