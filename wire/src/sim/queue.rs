//! The simulator's event queue: a timing wheel of one-microsecond slots over a window of
//! [`SLOTS`] microseconds, backed by a binary heap for events beyond the window.
//!
//! Why not only a heap: a 1000-receiver multicast schedules 1000 deliveries per datagram, and
//! in a debug build the heap's comparisons dominated the run time. A wheel slot is a FIFO, so
//! pushing and popping cost no comparisons at all.
//!
//! Invariants:
//! - Pop order is exactly `(time, push order)`: every slot holds events of a single instant
//!   in push order, and an event is moved from the heap into the wheel before any later push
//!   can land in its slot (migration happens whenever the window moves).
//! - Wheel entries have `cursor <= time < cursor + SLOTS`; heap entries have
//!   `time >= cursor + SLOTS`.
//! - Pushing at a time before the cursor is allowed (a driver may pop a superseded timer and
//!   then schedule something earlier): the window moves back and the entries that fall out of
//!   it go to the heap, keeping their push order.

use std::collections::{BinaryHeap, VecDeque};

use crate::time::Instant;

/// Width of the wheel window in microseconds (16.4 ms).
pub(crate) const SLOTS: usize = 1 << 14;
const MASK: u64 = SLOTS as u64 - 1;
const WORDS: usize = SLOTS / 64;

/// A heap entry: `key = time << 64 | seq`, ordered so the heap pops the smallest key first.
#[derive(Debug)]
struct Far<T> {
    key: u128,
    item: T,
}

impl<T> PartialEq for Far<T> {
    fn eq(&self, other: &Self) -> bool {
        self.key == other.key
    }
}
impl<T> Eq for Far<T> {}
impl<T> PartialOrd for Far<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Far<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other.key.cmp(&self.key)
    }
}

impl<T> Far<T> {
    fn time(&self) -> u64 {
        (self.key >> 64) as u64
    }
}

/// Events ordered by time, ties broken by push order.
#[derive(Debug)]
pub(crate) struct EventQueue<T> {
    /// Start of the wheel window, in microseconds.
    cursor: u64,
    /// Slot `t & MASK` holds `(seq, item)` for events at time `t` inside the window.
    slots: Vec<VecDeque<(u64, T)>>,
    /// Bit `i` set iff slot `i` is non-empty.
    occupied: Vec<u64>,
    in_wheel: usize,
    far: BinaryHeap<Far<T>>,
    next_seq: u64,
}

impl<T> EventQueue<T> {
    pub(crate) fn new() -> Self {
        EventQueue {
            cursor: 0,
            slots: (0..SLOTS).map(|_| VecDeque::new()).collect(),
            occupied: vec![0; WORDS],
            in_wheel: 0,
            far: BinaryHeap::new(),
            next_seq: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.in_wheel + self.far.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn push(&mut self, time: Instant, item: T) {
        let t = time.as_micros();
        let seq = self.next_seq;
        self.next_seq += 1;
        if t < self.cursor {
            self.rewind(t);
        }
        if t - self.cursor < SLOTS as u64 {
            self.insert_slot(t, seq, item);
        } else {
            self.far.push(Far {
                key: (u128::from(t) << 64) | u128::from(seq),
                item,
            });
        }
    }

    /// Time of the earliest event.
    pub(crate) fn peek_time(&self) -> Option<Instant> {
        self.next_slot_time()
            .or_else(|| self.far.peek().map(Far::time))
            .map(Instant::from_micros)
    }

    /// The earliest event, without removing it.
    pub(crate) fn peek(&self) -> Option<(Instant, &T)> {
        match self.next_slot_time() {
            Some(t) => {
                let (_, item) = self.slots[(t & MASK) as usize].front()?;
                Some((Instant::from_micros(t), item))
            }
            None => self
                .far
                .peek()
                .map(|f| (Instant::from_micros(f.time()), &f.item)),
        }
    }

    pub(crate) fn pop(&mut self) -> Option<(Instant, T)> {
        let t = match self.next_slot_time() {
            Some(t) => t,
            None => self.far.peek()?.time(),
        };
        if t != self.cursor {
            self.cursor = t;
            self.migrate();
        }
        let i = (t & MASK) as usize;
        let (_, item) = self.slots[i].pop_front()?;
        self.in_wheel -= 1;
        if self.slots[i].is_empty() {
            self.occupied[i / 64] &= !(1 << (i % 64));
        }
        Some((Instant::from_micros(t), item))
    }

    fn insert_slot(&mut self, t: u64, seq: u64, item: T) {
        let i = (t & MASK) as usize;
        self.slots[i].push_back((seq, item));
        self.occupied[i / 64] |= 1 << (i % 64);
        self.in_wheel += 1;
    }

    /// Time of the first non-empty slot at or after the cursor (circularly).
    fn next_slot_time(&self) -> Option<u64> {
        if self.in_wheel == 0 {
            return None;
        }
        let start = (self.cursor & MASK) as usize;
        let mut w = start / 64;
        let mut word = self.occupied[w] & (!0u64 << (start % 64));
        // WORDS + 1 words: the start word's low bits (the window's far end) come last.
        for _ in 0..=WORDS {
            if word != 0 {
                let i = (w * 64) as u64 + u64::from(word.trailing_zeros());
                return Some(self.cursor + (i.wrapping_sub(start as u64) & MASK));
            }
            w = (w + 1) % WORDS;
            word = self.occupied[w];
        }
        None
    }

    /// Moves heap entries that entered the window into their slots, in `(time, seq)` order.
    fn migrate(&mut self) {
        let end = self.cursor.saturating_add(SLOTS as u64);
        while self.far.peek().is_some_and(|f| f.time() < end) {
            let Some(f) = self.far.pop() else { break };
            self.insert_slot(f.time(), f.key as u64, f.item);
        }
    }

    /// Moves the window back to start at `t`; wheel entries beyond the new window go to the
    /// heap with their original sequence numbers.
    fn rewind(&mut self, t: u64) {
        let new_end = t.saturating_add(SLOTS as u64);
        let old = self.cursor;
        let start = (old & MASK) as usize;
        for w in 0..WORDS {
            let mut word = self.occupied[w];
            while word != 0 {
                let bit = word.trailing_zeros() as usize;
                word &= word - 1;
                let i = w * 64 + bit;
                let time = old + ((i as u64).wrapping_sub(start as u64) & MASK);
                if time >= new_end {
                    let slot = std::mem::take(&mut self.slots[i]);
                    self.in_wheel -= slot.len();
                    self.occupied[w] &= !(1 << bit);
                    for (seq, item) in slot {
                        self.far.push(Far {
                            key: (u128::from(time) << 64) | u128::from(seq),
                            item,
                        });
                    }
                }
            }
        }
        self.cursor = t;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::rng::Rng;
    use std::cmp::Reverse;

    fn t(us: u64) -> Instant {
        Instant::from_micros(us)
    }

    #[test]
    fn ties_pop_in_push_order_across_wheel_and_heap() {
        let mut q = EventQueue::new();
        let far = SLOTS as u64 * 3 + 7;
        q.push(t(far), "far-1");
        q.push(t(5), "near-1");
        q.push(t(5), "near-2");
        q.push(t(far), "far-2");
        q.push(t(0), "zero");
        assert_eq!(q.len(), 5);
        assert_eq!(q.peek_time(), Some(t(0)));
        assert_eq!(q.pop(), Some((t(0), "zero")));
        assert_eq!(q.pop(), Some((t(5), "near-1")));
        // Once the window has moved near `far`, a new push there queues behind the old ones.
        assert_eq!(q.pop(), Some((t(5), "near-2")));
        assert_eq!(q.peek(), Some((t(far), &"far-1")));
        assert_eq!(q.pop(), Some((t(far), "far-1")));
        q.push(t(far), "far-3");
        assert_eq!(q.pop(), Some((t(far), "far-2")));
        assert_eq!(q.pop(), Some((t(far), "far-3")));
        assert_eq!(q.pop(), None);
        assert!(q.is_empty());
    }

    #[test]
    fn push_before_cursor_rewinds_the_window() {
        let mut q = EventQueue::new();
        let s = SLOTS as u64;
        q.push(t(10 * s), "a");
        q.push(t(10 * s + s - 1), "b");
        assert_eq!(q.pop(), Some((t(10 * s), "a")));
        // Earlier than the cursor: "b" leaves the window for the heap and comes back later.
        q.push(t(9 * s), "c");
        q.push(t(10 * s + s - 1), "d");
        assert_eq!(q.pop(), Some((t(9 * s), "c")));
        assert_eq!(q.pop(), Some((t(10 * s + s - 1), "b")));
        assert_eq!(q.pop(), Some((t(10 * s + s - 1), "d")));
        assert_eq!(q.pop(), None);
    }

    /// The wheel against a plain heap of `(time, seq)` under random pushes and pops, with
    /// times near and far, and pushes before the last popped time.
    #[test]
    fn matches_reference_heap() {
        for seed in 0..20 {
            let mut rng = Rng::new(seed);
            let mut q = EventQueue::new();
            let mut reference = BinaryHeap::new();
            let mut now = 0u64;
            let mut seq = 0u64;
            for _ in 0..20_000 {
                if rng.chance(0.55) {
                    let base = if rng.chance(0.05) {
                        now.saturating_sub(rng.up_to(3 * SLOTS as u64))
                    } else {
                        now
                    };
                    let ahead = match rng.up_to(9) {
                        0 => 0,
                        1..=6 => rng.up_to(2_000),
                        7 => rng.up_to(SLOTS as u64 * 2),
                        _ => rng.up_to(1 << 30),
                    };
                    q.push(t(base + ahead), seq);
                    reference.push(Reverse((base + ahead, seq)));
                    seq += 1;
                } else {
                    let want = reference.pop().map(|Reverse((time, s))| (t(time), s));
                    assert_eq!(q.peek_time(), want.map(|(time, _)| time), "seed {seed}");
                    assert_eq!(q.pop(), want, "seed {seed}");
                    if let Some((time, _)) = want {
                        now = time.as_micros();
                    }
                }
                assert_eq!(q.len(), reference.len());
            }
            while let Some(Reverse((time, s))) = reference.pop() {
                assert_eq!(q.pop(), Some((t(time), s)), "seed {seed}");
            }
            assert!(q.is_empty());
        }
    }
}
