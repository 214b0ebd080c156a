//! RFC 6962 Merkle tree hashing (section 2.1): tree heads, inclusion proofs and consistency
//! proofs, and their verification, over leaf hashes. This is what makes an audit checkpoint a
//! transparency-log tree head: an auditor holding one checkpoint can be shown that an entry is in
//! the log (inclusion) and that a later checkpoint extends it without rewriting it (consistency),
//! with the same algorithms as Certificate Transparency and the C2SP tlog tools.

use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// The hash of a leaf: `SHA-256(0x00 ‖ data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// The hash of an interior node: `SHA-256(0x01 ‖ left ‖ right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// The largest power of two smaller than `n` (`n` ≥ 2).
fn split(n: usize) -> usize {
    let mut k = 1;
    while k << 1 < n {
        k <<= 1;
    }
    k
}

/// The Merkle tree hash (MTH) of `leaves` (leaf hashes); the empty tree's is SHA-256 of nothing.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => Sha256::digest([]).into(),
        1 => leaves[0],
        n => {
            let k = split(n);
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// The right edge of a growing tree: the heads of its perfect subtrees, largest first (one per
/// set bit of the size). Appending a leaf and taking the tree head cost O(log n), so a log keeps
/// its tree head current without reading its leaves again.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frontier {
    size: u64,
    heads: Vec<Hash>,
}

impl Frontier {
    /// The empty tree.
    pub fn new() -> Self {
        Frontier::default()
    }

    /// Leaves appended so far.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut n = self.size;
        while n & 1 == 1 {
            // The subtree of the same size to the left is complete: merge with it.
            let left = self.heads.pop().unwrap_or([0; 32]);
            h = node_hash(&left, &h);
            n >>= 1;
        }
        self.heads.push(h);
        self.size += 1;
    }

    /// The tree head (MTH) of the leaves appended so far.
    pub fn root(&self) -> Hash {
        let mut it = self.heads.iter().rev();
        let Some(last) = it.next() else {
            return Sha256::digest([]).into();
        };
        it.fold(*last, |r, left| node_hash(left, &r))
    }

    /// The heads, concatenated (32 bytes each), to store.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.heads.concat()
    }

    /// A frontier read back from [`Frontier::to_bytes`] for a tree of `size` leaves; `None` if
    /// the bytes do not have one head per set bit of `size`.
    pub fn from_bytes(size: u64, bytes: &[u8]) -> Option<Frontier> {
        if bytes.len() != size.count_ones() as usize * 32 {
            return None;
        }
        let heads = bytes
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap_or([0; 32]))
            .collect();
        Some(Frontier { size, heads })
    }
}

/// The audit path of leaf `index` in the tree of `leaves` (RFC 6962 2.1.1), leaf first.
pub fn inclusion_proof(index: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if index >= leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    path(index, leaves, &mut proof);
    Some(proof)
}

fn path(m: usize, d: &[Hash], out: &mut Vec<Hash>) {
    let n = d.len();
    if n <= 1 {
        return;
    }
    let k = split(n);
    if m < k {
        path(m, &d[..k], out);
        out.push(root(&d[k..]));
    } else {
        path(m - k, &d[k..], out);
        out.push(root(&d[..k]));
    }
}

/// The consistency proof from the tree of the first `old` leaves to the tree of all `leaves`
/// (RFC 6962 2.1.2).
pub fn consistency_proof(old: usize, leaves: &[Hash]) -> Option<Vec<Hash>> {
    if old == 0 || old > leaves.len() {
        return None;
    }
    let mut proof = Vec::new();
    subproof(old, leaves, true, &mut proof);
    Some(proof)
}

fn subproof(m: usize, d: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = d.len();
    if m == n {
        if !complete {
            out.push(root(d));
        }
        return;
    }
    let k = split(n);
    if m <= k {
        subproof(m, &d[..k], complete, out);
        out.push(root(&d[k..]));
    } else {
        subproof(m - k, &d[k..], false, out);
        out.push(root(&d[..k]));
    }
}

/// The consistency proof from the tree whose right edge is `old` to that tree with `appended`
/// added (RFC 6962 2.1.2), computed from the old tree's right edge and the new leaves alone: every
/// node of such a proof is either one of the old tree's perfect subtrees on its right edge, or a
/// subtree of the new leaves. So a log proves its checkpoints consistent in time linear in what was
/// appended between them, whatever its size. The same proof as [`consistency_proof`].
pub fn consistency_proof_extending(old: &Frontier, appended: &[Hash]) -> Option<Vec<Hash>> {
    let m = usize::try_from(old.size).ok()?;
    if m == 0 {
        return None;
    }
    // The old tree's perfect subtrees as leaf ranges, largest (leftmost) first.
    let mut edges = Vec::with_capacity(old.heads.len());
    let mut start = 0usize;
    for (bit, head) in (0..usize::BITS)
        .rev()
        .filter(|b| m >> b & 1 == 1)
        .zip(&old.heads)
    {
        edges.push((start, start + (1 << bit), *head));
        start += 1 << bit;
    }
    let mth = |lo: usize, hi: usize| -> Option<Hash> {
        if hi <= m {
            edges
                .iter()
                .find(|(a, b, _)| *a == lo && *b == hi)
                .map(|(_, _, h)| *h)
        } else if lo >= m {
            Some(root(appended.get(lo - m..hi - m)?))
        } else {
            None
        }
    };
    fn sub(
        m: usize,
        lo: usize,
        hi: usize,
        complete: bool,
        mth: &dyn Fn(usize, usize) -> Option<Hash>,
        out: &mut Vec<Hash>,
    ) -> Option<()> {
        let n = hi - lo;
        if m - lo == n {
            if !complete {
                out.push(mth(lo, hi)?);
            }
            return Some(());
        }
        let k = split(n);
        if m - lo <= k {
            sub(m, lo, lo + k, complete, mth, out)?;
            out.push(mth(lo + k, hi)?);
        } else {
            sub(m, lo + k, hi, false, mth, out)?;
            out.push(mth(lo, lo + k)?);
        }
        Some(())
    }
    let mut proof = Vec::new();
    sub(m, 0, m + appended.len(), true, &mth, &mut proof)?;
    Some(proof)
}

/// Does `proof` show that `leaf` is leaf `index` of the tree of `size` leaves whose head is
/// `root`? (The verification of RFC 9162 2.1.3.2.)
pub fn verify_inclusion(leaf: &Hash, index: u64, size: u64, proof: &[Hash], root: &Hash) -> bool {
    if index >= size {
        return false;
    }
    let (mut f_n, mut s_n) = (index, size - 1);
    let mut r = *leaf;
    for p in proof {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            r = node_hash(p, &r);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            r = node_hash(&r, p);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    s_n == 0 && r == *root
}

/// Does `proof` show that the tree of `size2` leaves with head `root2` extends the tree of
/// `size1` leaves with head `root1`? (The verification of RFC 9162 2.1.4.2.)
pub fn verify_consistency(
    size1: u64,
    size2: u64,
    proof: &[Hash],
    root1: &Hash,
    root2: &Hash,
) -> bool {
    if size1 == 0 || size1 > size2 {
        return false;
    }
    if size1 == size2 {
        return proof.is_empty() && root1 == root2;
    }
    let mut path: Vec<Hash> = proof.to_vec();
    if size1.is_power_of_two() {
        path.insert(0, *root1);
    }
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    let (mut f_n, mut s_n) = (size1 - 1, size2 - 1);
    while f_n & 1 == 1 {
        f_n >>= 1;
        s_n >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if s_n == 0 {
            return false;
        }
        if f_n & 1 == 1 || f_n == s_n {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if f_n & 1 == 0 {
                while f_n & 1 == 0 && f_n != 0 {
                    f_n >>= 1;
                    s_n >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        f_n >>= 1;
        s_n >>= 1;
    }
    fr == *root1 && sr == *root2 && s_n == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_from_the_old_right_edge_and_the_new_leaves_is_the_full_proof() {
        let leaves: Vec<Hash> = (0u8..40).map(|i| leaf_hash(&[i])).collect();
        for n in 1..=leaves.len() {
            let mut old = Frontier::new();
            for m in 1..=n {
                old.push(leaves[m - 1]);
                let full = consistency_proof(m, &leaves[..n]).unwrap();
                let edge = consistency_proof_extending(&old, &leaves[m..n]).unwrap();
                assert_eq!(edge, full, "{m} -> {n}");
                assert!(verify_consistency(
                    m as u64,
                    n as u64,
                    &edge,
                    &old.root(),
                    &root(&leaves[..n])
                ));
            }
        }
        assert!(consistency_proof_extending(&Frontier::new(), &leaves).is_none());
    }

    fn h(s: &str) -> Hash {
        hex::decode(s).unwrap().try_into().unwrap()
    }

    /// The leaves of the Certificate Transparency reference tree.
    fn ct_leaves() -> Vec<Hash> {
        [
            "",
            "00",
            "10",
            "2021",
            "3031",
            "40414243",
            "5051525354555657",
            "606162636465666768696a6b6c6d6e6f",
        ]
        .iter()
        .map(|d| leaf_hash(&hex::decode(d).unwrap()))
        .collect()
    }

    /// The published tree heads of the reference tree, sizes 0 to 8.
    const CT_ROOTS: [&str; 9] = [
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
        "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
        "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
        "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
        "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
        "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
        "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
    ];

    #[test]
    fn tree_heads_are_the_published_ones() {
        let leaves = ct_leaves();
        let mut f = Frontier::new();
        for (n, want) in CT_ROOTS.iter().enumerate() {
            assert_eq!(root(&leaves[..n]), h(want), "size {n}");
            assert_eq!(f.root(), h(want), "frontier at size {n}");
            if n < leaves.len() {
                f.push(leaves[n]);
            }
        }
    }

    #[test]
    fn a_frontier_keeps_the_tree_head_of_every_size_and_survives_storage() {
        let leaves: Vec<Hash> = (0u32..70).map(|i| leaf_hash(&i.to_be_bytes())).collect();
        let mut f = Frontier::new();
        for n in 0..leaves.len() {
            assert_eq!(f.root(), root(&leaves[..n]), "size {n}");
            let back = Frontier::from_bytes(f.size(), &f.to_bytes()).unwrap();
            assert_eq!(back, f);
            let mut longer = f.to_bytes();
            longer.extend_from_slice(&[0; 32]);
            assert!(Frontier::from_bytes(f.size(), &longer).is_none());
            f.push(leaves[n]);
        }
    }

    #[test]
    fn proofs_are_the_published_ones_and_verify() {
        let leaves = ct_leaves();
        // (leaf index, tree size, audit path), from the reference implementation's tests.
        let inclusion: [(usize, usize, &[&str]); 4] = [
            (
                0,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                5,
                8,
                &[
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                3,
                &["fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125"],
            ),
            (
                1,
                5,
                &[
                    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (i, n, path) in inclusion {
            let want: Vec<Hash> = path.iter().map(|p| h(p)).collect();
            assert_eq!(
                inclusion_proof(i, &leaves[..n]).unwrap(),
                want,
                "{i} in {n}"
            );
            let head = h(CT_ROOTS[n]);
            assert!(verify_inclusion(
                &leaves[i], i as u64, n as u64, &want, &head
            ));
        }
        // (old size, new size, proof).
        let consistency: [(usize, usize, &[&str]); 4] = [
            (1, 1, &[]),
            (
                1,
                8,
                &[
                    "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
                ],
            ),
            (
                6,
                8,
                &[
                    "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
                    "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
                    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
                ],
            ),
            (
                2,
                5,
                &[
                    "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
                    "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
                ],
            ),
        ];
        for (m, n, proof) in consistency {
            let want: Vec<Hash> = proof.iter().map(|p| h(p)).collect();
            assert_eq!(
                consistency_proof(m, &leaves[..n]).unwrap(),
                want,
                "{m} to {n}"
            );
            assert!(verify_consistency(
                m as u64,
                n as u64,
                &want,
                &h(CT_ROOTS[m]),
                &h(CT_ROOTS[n])
            ));
        }
    }

    #[test]
    fn every_proof_of_every_tree_up_to_40_leaves_verifies_and_a_changed_one_does_not() {
        let leaves: Vec<Hash> = (0u32..40).map(|i| leaf_hash(&i.to_le_bytes())).collect();
        let heads: Vec<Hash> = (0..=leaves.len()).map(|n| root(&leaves[..n])).collect();
        for n in 1..=leaves.len() {
            let t = &leaves[..n];
            for i in 0..n {
                let p = inclusion_proof(i, t).unwrap();
                assert!(verify_inclusion(&t[i], i as u64, n as u64, &p, &heads[n]));
                let mut other = t[i];
                other[0] ^= 1;
                assert!(!verify_inclusion(&other, i as u64, n as u64, &p, &heads[n]));
                if n > 1 {
                    assert!(!verify_inclusion(
                        &t[i],
                        ((i + 1) % n) as u64,
                        n as u64,
                        &p,
                        &heads[n]
                    ));
                }
            }
            for m in 1..=n {
                let p = consistency_proof(m, t).unwrap();
                assert!(
                    verify_consistency(m as u64, n as u64, &p, &heads[m], &heads[n]),
                    "{m} to {n}"
                );
                if m < n {
                    // A rewritten past: the old head no longer matches.
                    let mut old = heads[m];
                    old[31] ^= 1;
                    assert!(!verify_consistency(m as u64, n as u64, &p, &old, &heads[n]));
                    let mut new = heads[n];
                    new[0] ^= 1;
                    assert!(!verify_consistency(m as u64, n as u64, &p, &heads[m], &new));
                }
            }
        }
        assert!(inclusion_proof(3, &leaves[..3]).is_none());
        assert!(consistency_proof(0, &leaves[..3]).is_none());
        assert!(!verify_inclusion(&leaves[0], 3, 3, &[], &heads[3]));
    }
}
