//! XXH64, streaming: every byte of every stream is hashed on both ends.
//!
//! Hand-written (no dependency) and fast enough (several GB/s) not to be
//! what the bench measures. The result is the standard XXH64 digest.

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

const STRIPE: usize = 32;

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge_round(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn read_u64(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    u64::from_le_bytes(w)
}

#[inline(always)]
fn read_u32(b: &[u8]) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[..4]);
    u32::from_le_bytes(w)
}

/// A streaming XXH64 state: `update` with any split of the bytes gives the
/// same `digest` as one call with all of them.
#[derive(Debug, Clone)]
pub struct Xxh64 {
    seed: u64,
    total: u64,
    v: [u64; 4],
    mem: [u8; STRIPE],
    mem_len: usize,
}

impl Default for Xxh64 {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Xxh64 {
    /// A fresh state.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            total: 0,
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            mem: [0; STRIPE],
            mem_len: 0,
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.total
    }

    #[inline(always)]
    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        v[0] = round(v[0], read_u64(&s[0..]));
        v[1] = round(v[1], read_u64(&s[8..]));
        v[2] = round(v[2], read_u64(&s[16..]));
        v[3] = round(v[3], read_u64(&s[24..]));
    }

    /// Hash `data` after what came before.
    #[inline]
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.mem_len + data.len() < STRIPE {
            self.mem[self.mem_len..self.mem_len + data.len()].copy_from_slice(data);
            self.mem_len += data.len();
            return;
        }
        if self.mem_len > 0 {
            let fill = STRIPE - self.mem_len;
            self.mem[self.mem_len..].copy_from_slice(&data[..fill]);
            let mem = self.mem;
            Self::stripe(&mut self.v, &mem);
            data = &data[fill..];
            self.mem_len = 0;
        }
        let mut v = self.v;
        let mut chunks = data.chunks_exact(STRIPE);
        for s in &mut chunks {
            Self::stripe(&mut v, s);
        }
        self.v = v;
        let rest = chunks.remainder();
        self.mem[..rest.len()].copy_from_slice(rest);
        self.mem_len = rest.len();
    }

    /// The digest of everything hashed so far.
    pub fn digest(&self) -> u64 {
        let [v1, v2, v3, v4] = self.v;
        let mut h = if self.total >= STRIPE as u64 {
            let mut h = v1
                .rotate_left(1)
                .wrapping_add(v2.rotate_left(7))
                .wrapping_add(v3.rotate_left(12))
                .wrapping_add(v4.rotate_left(18));
            h = merge_round(h, v1);
            h = merge_round(h, v2);
            h = merge_round(h, v3);
            merge_round(h, v4)
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.mem[..self.mem_len];
        while rest.len() >= 8 {
            h ^= round(0, read_u64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            h ^= u64::from(read_u32(rest)).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= u64::from(b).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

/// What one end of a stream saw: how many bytes, and their hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Digest {
    /// Bytes.
    pub len: u64,
    /// XXH64 of the bytes.
    pub hash: u64,
}

impl Xxh64 {
    /// Length and digest together.
    pub fn finish(&self) -> Digest {
        Digest {
            len: self.total,
            hash: self.digest(),
        }
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, xxh64 {:016x}", self.len, self.hash)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn once(b: &[u8]) -> u64 {
        let mut h = Xxh64::new(0);
        h.update(b);
        h.digest()
    }

    #[test]
    fn known_vectors() {
        assert_eq!(once(b""), 0xEF46_DB37_51D8_E999);
        assert_eq!(once(b"a"), 0xD24E_C4F1_A98C_6E5B);
        assert_eq!(once(b"abc"), 0x44BC_2CF5_AD77_0999);
        assert_eq!(
            once(b"Nobody inspects the spammish repetition"),
            0xFBCE_A83C_8A37_8BF1
        );
    }

    #[test]
    fn any_split_gives_the_same_digest() {
        let data: Vec<u8> = (0..5000u32).map(|i| (i * 31 % 251) as u8).collect();
        let whole = once(&data);
        for step in [1usize, 3, 7, 31, 32, 33, 64, 100, 4096] {
            let mut h = Xxh64::new(0);
            for c in data.chunks(step) {
                h.update(c);
            }
            assert_eq!(h.digest(), whole, "step {step}");
            assert_eq!(h.len(), data.len() as u64);
        }
    }

    #[test]
    fn one_changed_byte_changes_the_digest() {
        let mut data = vec![7u8; 1000];
        let a = once(&data);
        data[500] = 8;
        assert_ne!(a, once(&data));
    }
}
