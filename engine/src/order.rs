//! Ordering checks: guarantee G1 (contiguity) as a checked operation.
//!
//! Every reader and writer of ops keeps a [`SeqTracker`] and calls
//! [`SeqTracker::try_advance`] for each op, so a gap or a repeat is a typed
//! error at the first op it touches, never a silent hole in a restore.

/// A break in the seq order: the op that arrived is not the one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    /// Ops `expected..found` are missing.
    #[error("seq {expected} is missing: the next op has seq {found}")]
    Gap {
        /// The seq that should have come next.
        expected: u64,
        /// The seq that came instead, larger than `expected`.
        found: u64,
    },
    /// An op came again, or the order went backwards.
    #[error("seq {found} repeats or goes back: seq {expected} was expected")]
    Regression {
        /// The seq that should have come next.
        expected: u64,
        /// The seq that came instead, smaller than `expected`.
        found: u64,
    },
}

/// Tracks the next seq a contiguous stream must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqTracker {
    next_seq: u64,
}

impl SeqTracker {
    /// A stream that starts at seq 1, as every stream does (G1).
    pub fn new() -> Self {
        Self::starting_at(1)
    }

    /// A stream resumed after `applied_through_seq`; a fresh one starts at 1.
    pub fn starting_at(next_seq: u64) -> Self {
        Self { next_seq }
    }

    /// Accepts `seq` if it is exactly the next one, and moves on.
    pub fn try_advance(&mut self, seq: u64) -> Result<(), OrderError> {
        let expected = self.next_seq;
        match seq.cmp(&expected) {
            std::cmp::Ordering::Equal => {
                self.next_seq += 1;
                Ok(())
            }
            std::cmp::Ordering::Greater => Err(OrderError::Gap {
                expected,
                found: seq,
            }),
            std::cmp::Ordering::Less => Err(OrderError::Regression {
                expected,
                found: seq,
            }),
        }
    }

    /// Accepts a whole batch of seqs, or none of them: on an error the
    /// tracker is as it was, so nothing of a broken batch counts as seen.
    pub fn try_advance_all(
        &mut self,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Result<(), OrderError> {
        let mut ahead = *self;
        for seq in seqs {
            ahead.try_advance(seq)?;
        }
        *self = ahead;
        Ok(())
    }

    /// The seq the next op must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The seq of the last op accepted; 0 before the first.
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }
}

impl Default for SeqTracker {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_with_a_gap_advances_nothing() {
        let mut tracker = SeqTracker::starting_at(5);
        assert_eq!(
            tracker.try_advance_all([5, 6, 8]),
            Err(OrderError::Gap {
                expected: 7,
                found: 8
            })
        );
        assert_eq!(tracker.next_seq(), 5);
        tracker.try_advance_all([5, 6, 7]).expect("in order");
        assert_eq!(tracker.last_seq(), 7);
    }

    #[test]
    fn accepts_a_contiguous_run() {
        let mut tracker = SeqTracker::new();
        for seq in 1..=5 {
            tracker.try_advance(seq).expect("contiguous");
        }
        assert_eq!(tracker.last_seq(), 5);
    }

    #[test]
    fn names_the_missing_seq_on_a_gap() {
        let mut tracker = SeqTracker::new();
        tracker.try_advance(1).expect("first");
        assert_eq!(
            tracker.try_advance(3),
            Err(OrderError::Gap {
                expected: 2,
                found: 3
            })
        );
        // A failed advance leaves the tracker where it was.
        assert_eq!(tracker.next_seq(), 2);
    }

    #[test]
    fn refuses_a_repeat() {
        let mut tracker = SeqTracker::starting_at(10);
        assert_eq!(
            tracker.try_advance(9),
            Err(OrderError::Regression {
                expected: 10,
                found: 9
            })
        );
    }
}
