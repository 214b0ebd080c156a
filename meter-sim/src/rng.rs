//! A small seeded generator (SplitMix64) for fault and noise decisions, so that a run can be
//! repeated exactly. Not cryptographic: key material always comes from the system RNG.

/// SplitMix64.
#[derive(Debug, Clone)]
pub struct NoiseRng(u64);

impl NoiseRng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        NoiseRng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p`.
    pub fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Number of trials before the next success of probability `p` (geometric), capped.
    pub fn geometric(&mut self, p: f64) -> u64 {
        if p <= 0.0 {
            return u64::MAX;
        }
        if p >= 1.0 {
            return 0;
        }
        let u = self.unit().max(f64::MIN_POSITIVE);
        let n = (u.ln() / (1.0 - p).ln()).floor();
        if n >= u64::MAX as f64 {
            u64::MAX
        } else {
            n as u64
        }
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next_u64() % n }
    }
}
