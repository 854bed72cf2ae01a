//! Weighted Maglev rings (Eisenbud et al., "Maglev: A Fast and Reliable Software Network
//! Load Balancer", NSDI 2016, section 3.4), computed in userspace and written to the
//! `MAGLEV` map as changed slots only.
//!
//! Each peer walks its own permutation of the ring, `offset + j * skip (mod size)`, and the
//! peers take turns claiming the next free slot of their permutation until the ring is full.
//! `offset` and `skip` come from two independent hashes of the peer's *name*, so a peer
//! keeps its positions across restarts and when it moves to another map slot. Weights follow
//! the weighted variant Katran uses: in every round each peer adds its weight to a credit and
//! claims one slot whenever the credit reaches the largest weight, so the heaviest peer
//! claims a slot every round and the others proportionally less often.

use redirector_ebpf::PEER_NONE;

/// One ring member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Member<'a> {
    /// The identity the permutation derives from.
    pub name: &'a str,
    /// The value written to the ring for this member (the peer slot).
    pub slot: u32,
    /// Relative share; members with weight 0 get nothing.
    pub weight: u32,
}

/// 64-bit FNV-1a over `bytes` starting from `seed`, finished with the murmur3 `fmix64`
/// avalanche. Fixed here (not `std`'s hasher, whose output may change between Rust
/// releases) because ring positions must be stable across builds.
fn name_hash(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    h
}

const OFFSET_SEED: u64 = 0x6d61_676c_6576_3031; // "maglev01"
const SKIP_SEED: u64 = 0x7032_7063_646e_5f73; // "p2pcdn_s"

/// `(offset, skip)` of `name` in a ring of `size` slots; `skip` is in `1..size`, so with a
/// prime `size` the walk visits every slot.
pub fn permutation(name: &str, size: u32) -> (u32, u32) {
    let size = u64::from(size.max(2));
    let offset = name_hash(OFFSET_SEED, name.as_bytes()) % size;
    let skip = name_hash(SKIP_SEED, name.as_bytes()) % (size - 1) + 1;
    // Both are below `size`, which came from a u32.
    (offset as u32, skip as u32)
}

/// Builds the ring of `size` slots (a prime, checked by the caller) for `members`.
/// Every slot holds a member's `slot`, or [`PEER_NONE`] if no member has a weight.
pub fn ring(members: &[Member<'_>], size: u32) -> Vec<u32> {
    let mut table = vec![PEER_NONE; size as usize];
    // Order by name so the result depends on the members, not on how they were listed.
    let mut members: Vec<&Member<'_>> = members.iter().filter(|m| m.weight > 0).collect();
    members.sort_by(|a, b| a.name.cmp(b.name).then(a.slot.cmp(&b.slot)));
    if members.is_empty() || size == 0 {
        return table;
    }
    let max_weight = u64::from(members.iter().map(|m| m.weight).max().unwrap_or(1));
    let walks: Vec<(u64, u64)> = members
        .iter()
        .map(|m| {
            let (offset, skip) = permutation(m.name, size);
            (u64::from(offset), u64::from(skip))
        })
        .collect();
    let size64 = u64::from(size);
    let mut next = vec![0u64; members.len()];
    let mut credit = vec![0u64; members.len()];
    let mut filled = 0u32;
    loop {
        for (i, member) in members.iter().enumerate() {
            credit[i] += u64::from(member.weight);
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            let (offset, skip) = walks[i];
            // With a prime size the walk is a permutation: a free slot is always found
            // within `size` steps while the ring is not full.
            let mut cell = ((offset + next[i] * skip) % size64) as usize;
            while table[cell] != PEER_NONE {
                next[i] += 1;
                cell = ((offset + next[i] * skip) % size64) as usize;
            }
            table[cell] = member.slot;
            next[i] += 1;
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

/// The `(index, value)` pairs to write to turn `current` into `desired` (indexes relative
/// to the start of the ring). Slots past the end of `current` count as changed.
pub fn diff(current: &[u32], desired: &[u32]) -> Vec<(u32, u32)> {
    desired
        .iter()
        .enumerate()
        .filter(|&(i, &want)| current.get(i) != Some(&want))
        .map(|(i, &want)| (i as u32, want))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    const SIZE: u32 = 65_537;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("peer-{i}")).collect()
    }

    fn members(names: &[String], weights: &[u32]) -> Vec<Member<'static>> {
        names
            .iter()
            .zip(weights)
            .enumerate()
            .map(|(i, (n, &w))| Member {
                name: Box::leak(n.clone().into_boxed_str()),
                slot: i as u32,
                weight: w,
            })
            .collect()
    }

    fn shares(table: &[u32]) -> HashMap<u32, usize> {
        let mut counts = HashMap::new();
        for &v in table {
            *counts.entry(v).or_insert(0) += 1;
        }
        counts
    }

    #[test]
    fn permutations_cover_the_ring() {
        for name in ["a", "peer-1", "edge.example"] {
            let (offset, skip) = permutation(name, 13);
            assert!(offset < 13 && (1..13).contains(&skip));
            let mut seen = [false; 13];
            for j in 0..13u32 {
                seen[((offset + j * skip) % 13) as usize] = true;
            }
            assert!(seen.iter().all(|&s| s));
        }
        assert_ne!(permutation("a", SIZE), permutation("b", SIZE));
    }

    #[test]
    fn no_members_means_no_peer() {
        assert!(ring(&[], 251).iter().all(|&v| v == PEER_NONE));
        let zero = members(&names(2), &[0, 0]);
        assert!(ring(&zero, 251).iter().all(|&v| v == PEER_NONE));
    }

    #[test]
    fn one_member_takes_every_slot() {
        let one = members(&names(1), &[5]);
        assert!(ring(&one, 251).iter().all(|&v| v == 0));
    }

    #[test]
    fn equal_weights_balance_within_a_few_percent() {
        let n = names(7);
        let table = ring(&members(&n, &[1; 7]), SIZE);
        let counts = shares(&table);
        assert!(!counts.contains_key(&PEER_NONE), "ring is full");
        let fair = f64::from(SIZE) / 7.0;
        for slot in 0..7u32 {
            let got = counts[&slot] as f64;
            assert!(
                (got / fair - 1.0).abs() < 0.03,
                "slot {slot}: {got} vs {fair}"
            );
        }
    }

    #[test]
    fn weights_set_the_shares() {
        let n = names(4);
        let weights = [1, 2, 3, 4];
        let table = ring(&members(&n, &weights), SIZE);
        let counts = shares(&table);
        for (slot, &w) in weights.iter().enumerate() {
            let want = f64::from(SIZE) * f64::from(w) / 10.0;
            let got = counts[&(slot as u32)] as f64;
            assert!(
                (got / want - 1.0).abs() < 0.03,
                "weight {w}: {got} vs {want}"
            );
        }
        let zero_weight = members(&n, &[1, 0, 1, 1]);
        assert!(
            !ring(&zero_weight, SIZE).contains(&1),
            "weight 0 gets nothing"
        );
    }

    #[test]
    fn positions_follow_names_not_slots_or_order() {
        let n = names(5);
        let a = members(&n, &[1; 5]);
        let mut b = a.clone();
        b.reverse();
        assert_eq!(
            ring(&a, 251),
            ring(&b, 251),
            "listing order does not matter"
        );
        // Moving every peer to another slot relabels the ring and changes nothing else.
        let moved: Vec<Member<'_>> = a
            .iter()
            .map(|m| Member {
                slot: m.slot + 100,
                ..m.clone()
            })
            .collect();
        let before = ring(&a, SIZE);
        let after = ring(&moved, SIZE);
        assert!(before.iter().zip(&after).all(|(x, y)| x + 100 == *y));
    }

    #[test]
    fn removing_a_peer_moves_few_other_slots() {
        let n = names(10);
        let all = members(&n, &[1; 10]);
        let before = ring(&all, SIZE);
        let without: Vec<Member<'_>> = all.iter().filter(|m| m.slot != 3).cloned().collect();
        let after = ring(&without, SIZE);
        let moved = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != 3 && b != a)
            .count();
        let kept_by_others = before.iter().filter(|&&b| b != 3).count();
        // Maglev trades a little disruption for balance; the paper reports a few percent.
        assert!(
            (moved as f64) < 0.05 * kept_by_others as f64,
            "{moved} of {kept_by_others} slots of the remaining peers moved"
        );
        assert!(!after.contains(&3));
    }

    #[test]
    fn adding_a_peer_takes_its_share_and_moves_little_else() {
        let n = names(9);
        let nine = members(&n, &[1; 9]);
        let mut ten = nine.clone();
        ten.push(Member {
            name: "newcomer",
            slot: 9,
            weight: 1,
        });
        let before = ring(&nine, SIZE);
        let after = ring(&ten, SIZE);
        let changed = diff(&before, &after);
        let to_new = changed.iter().filter(|(_, v)| *v == 9).count();
        let reshuffled = changed.len() - to_new;
        assert!((to_new as f64 / (f64::from(SIZE) / 10.0) - 1.0).abs() < 0.03);
        assert!(
            (reshuffled as f64) < 0.05 * f64::from(SIZE),
            "{reshuffled} slots moved between old peers"
        );
    }

    #[test]
    fn diff_lists_only_changed_slots() {
        assert_eq!(diff(&[1, 2, 3], &[1, 5, 3]), vec![(1, 5)]);
        assert!(diff(&[1, 2, 3], &[1, 2, 3]).is_empty());
        assert_eq!(
            diff(&[1], &[1, 2]),
            vec![(1, 2)],
            "a longer ring writes its tail"
        );
        let n = names(3);
        let table = ring(&members(&n, &[1, 1, 1]), 251);
        assert!(diff(&table, &ring(&members(&n, &[1, 1, 1]), 251)).is_empty());
    }

    #[test]
    fn ring_is_stable_across_builds() {
        // Golden values: a change here moves live peers' positions on upgrade (and so the
        // new connections of every client), which must be a deliberate decision.
        assert_eq!(permutation("peer-0", SIZE), (49_495, 42_893));
        assert_eq!(
            ring(&members(&names(3), &[1, 1, 1]), 13),
            vec![2, 2, 0, 1, 2, 1, 2, 0, 0, 0, 1, 0, 1]
        );
    }
}
