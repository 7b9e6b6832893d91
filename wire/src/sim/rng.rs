//! A small seeded PRNG for the simulator: xoshiro256** seeded through splitmix64.
//!
//! Invariants:
//! - The same seed (and stream number) always yields the same sequence, on every platform.
//! - [`Rng::stream`] derives an independent-looking generator per `(seed, stream)` pair, so the
//!   simulator gives every link its own stream: adding a link, or changing one link's traffic,
//!   never perturbs the draws of another link.
//! - Not cryptographic. It is for loss models and test scenarios only.

/// splitmix64 step: advances `state` and returns the next output.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256** generator (Blackman and Vigna), seeded through splitmix64.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Self {
        let mut sm = seed;
        let s = [
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
            splitmix64(&mut sm),
        ];
        // splitmix64 outputs are a bijection of distinct states, so the four words cannot all
        // be zero (the one state xoshiro must avoid).
        Rng { s }
    }

    /// The generator for stream number `stream` under `seed`. Distinct streams of one seed are
    /// seeded from distinct, well-mixed values, so their sequences are unrelated.
    pub fn stream(seed: u64, stream: u64) -> Self {
        let mut sm = stream ^ 0x5F1E_E7C0_A57F_1EE7;
        let mixed = splitmix64(&mut sm);
        Rng::new(seed ^ mixed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// A uniform float in `[0, 1)` with 53 bits of precision.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `true` with probability `p` (values outside `[0, 1]` act as 0 or 1). Draws nothing when
    /// `p <= 0`, so a disabled impairment does not consume randomness.
    pub fn chance(&mut self, p: f64) -> bool {
        if p <= 0.0 || p.is_nan() {
            return false;
        }
        self.next_f64() < p
    }

    /// A uniform integer in `[0, n]` (inclusive). Draws nothing when `n == 0`.
    pub fn up_to(&mut self, n: u64) -> u64 {
        if n == 0 {
            return 0;
        }
        match n.checked_add(1) {
            // Lemire's multiply-shift; the bias is below 2^-64 * n, irrelevant for simulation.
            Some(span) => ((u128::from(self.next_u64()) * u128::from(span)) >> 64) as u64,
            None => self.next_u64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_sequence_and_streams_differ() {
        let a: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        let b: Vec<u64> = (0..8)
            .map({
                let mut r = Rng::new(7);
                move |_| r.next_u64()
            })
            .collect();
        assert_eq!(a, b);
        let mut c = Rng::new(8);
        assert_ne!(a[0], c.next_u64());
        let mut s1 = Rng::stream(7, 1);
        let mut s2 = Rng::stream(7, 2);
        assert_ne!(s1.next_u64(), s2.next_u64());
        assert_ne!(Rng::stream(7, 1), Rng::new(7));
    }

    #[test]
    fn known_answer_for_seed_zero() {
        // splitmix64 from state 0 yields 0xE220A8397B1DCDAF first (published reference value);
        // this locks the seeding so recorded scenarios stay reproducible.
        let mut sm = 0u64;
        assert_eq!(splitmix64(&mut sm), 0xE220_A839_7B1D_CDAF);
        let mut r = Rng::new(0);
        let first = r.next_u64();
        let mut again = Rng::new(0);
        assert_eq!(first, again.next_u64());
    }

    #[test]
    fn floats_in_unit_interval_and_ranges_inclusive() {
        let mut r = Rng::new(42);
        let mut saw_top = false;
        let mut saw_zero = false;
        for _ in 0..10_000 {
            let f = r.next_f64();
            assert!((0.0..1.0).contains(&f));
            let v = r.up_to(3);
            assert!(v <= 3);
            saw_top |= v == 3;
            saw_zero |= v == 0;
        }
        assert!(saw_top && saw_zero);
        assert!(!r.chance(0.0));
        assert!(r.chance(1.0));
        assert_eq!(r.up_to(0), 0);
        let _ = r.up_to(u64::MAX);
    }

    #[test]
    fn chance_matches_probability() {
        let mut r = Rng::new(3);
        let n = 100_000;
        let hits = (0..n).filter(|_| r.chance(0.25)).count() as f64;
        // sigma = sqrt(n p (1-p)) ~= 137; allow 5 sigma.
        assert!((hits - 25_000.0).abs() < 5.0 * 137.0, "hits {hits}");
    }
}
