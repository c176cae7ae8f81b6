//! Grouping candidates for compute, shared by full mode's batches and a request's chunks:
//! length order, token-bounded runs, packing without padding, and repacking the survivors of
//! a pruning decision.

use super::offload::{Hidden, SpillFile};
use crate::error::Result;
use crate::models::PackedBatch;
use crate::tokenize::EncodedPair;
use candle_core::{DType, Device, Tensor};

/// Candidate indices sorted longest first (ties by index), so batches hold similar lengths.
pub(crate) fn length_order(pairs: &[EncodedPair]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..pairs.len()).collect();
    order.sort_by(|&a, &b| pairs[b].len().cmp(&pairs[a].len()).then(a.cmp(&b)));
    order
}

/// Consecutive runs of `order` with at most `max_count` candidates and (unless a single
/// candidate is longer) at most `max_tokens` tokens, so a batch of long documents is split
/// and activation memory stays bounded as in grating mode's chunks.
pub(crate) fn plan_batches(
    pairs: &[EncodedPair],
    order: &[usize],
    max_count: usize,
    max_tokens: usize,
) -> Vec<Vec<usize>> {
    let mut out: Vec<Vec<usize>> = Vec::new();
    let mut tokens = 0;
    for &m in order {
        let len = pairs[m].len();
        match out.last_mut() {
            Some(cur) if cur.len() < max_count && tokens + len <= max_tokens => {
                cur.push(m);
                tokens += len;
            }
            _ => {
                out.push(vec![m]);
                tokens = len;
            }
        }
    }
    out
}

/// Splits `members` (already in length order) into runs of at most `budget` tokens (a longer
/// candidate gets a chunk of its own).
pub(crate) fn plan_chunks(
    pairs: &[EncodedPair],
    members: &[usize],
    budget: usize,
) -> Vec<Vec<usize>> {
    plan_batches(pairs, members, usize::MAX, budget)
}

pub(crate) fn pack(pairs: &[EncodedPair], members: &[usize]) -> PackedBatch {
    PackedBatch::new(
        members
            .iter()
            .map(|&i| (pairs[i].ids.as_slice(), pairs[i].type_ids.as_slice())),
    )
}

/// Live candidates of one chunk and their hidden states `[tokens, hidden]`.
pub(crate) struct Chunk {
    pub members: Vec<usize>,
    pub batch: PackedBatch,
    pub hidden: Hidden,
}

/// Gathers the rows of the live members of `chunks` into new chunks under `budget`, dropping
/// each old chunk as soon as its survivors are copied.
pub(crate) fn repack(
    chunks: Vec<Chunk>,
    live: impl Fn(usize) -> bool,
    pairs: &[EncodedPair],
    budget: usize,
    spill: Option<&SpillFile>,
    (dtype, device): (DType, &Device),
) -> Result<Vec<Chunk>> {
    // (member, old chunk, first row, len) of each survivor, in order.
    let mut pieces = Vec::new();
    for (ci, c) in chunks.iter().enumerate() {
        for (j, &m) in c.members.iter().enumerate() {
            if live(m) {
                let (s, len) = c.batch.layout.spans[j];
                pieces.push((m, ci, s, len));
            }
        }
    }
    let members: Vec<usize> = pieces.iter().map(|p| p.0).collect();
    let plan = plan_chunks(pairs, &members, budget);
    let mut old: Vec<Option<Chunk>> = chunks.into_iter().map(Some).collect();
    let mut out = Vec::with_capacity(plan.len());
    let mut next_piece = 0;
    for group in plan {
        let group_pieces = &pieces[next_piece..next_piece + group.len()];
        next_piece += group.len();
        let mut parts = Vec::new();
        let mut run_chunk = usize::MAX;
        let mut run_rows: Vec<u32> = Vec::new();
        let flush = |ci: usize, rows: &mut Vec<u32>, parts: &mut Vec<Tensor>| -> Result<()> {
            if rows.is_empty() {
                return Ok(());
            }
            let c = old[ci].as_ref().expect("chunk still present");
            let hidden = c.hidden.get(spill, dtype, device)?;
            let idx = crate::ops::upload_u32(rows, rows.len(), device)?;
            parts.push(hidden.index_select(&idx, 0)?);
            rows.clear();
            Ok(())
        };
        for &(_, ci, s, len) in group_pieces {
            if ci != run_chunk {
                if run_chunk != usize::MAX {
                    flush(run_chunk, &mut run_rows, &mut parts)?;
                }
                run_chunk = ci;
            }
            run_rows.extend(s as u32..(s + len) as u32);
        }
        flush(run_chunk, &mut run_rows, &mut parts)?;
        // Old chunks wholly consumed by now can go.
        let last_used = group_pieces.last().map(|p| p.1).unwrap_or(0);
        for slot in old.iter_mut().take(last_used) {
            *slot = None;
        }
        let hidden = if parts.len() == 1 {
            parts.pop().expect("one part")
        } else {
            Tensor::cat(&parts, 0)?
        };
        let hidden = match spill {
            Some(s) => s.spill(&hidden)?,
            None => Hidden::Resident(hidden),
        };
        out.push(Chunk {
            batch: pack(pairs, &group),
            members: group,
            hidden,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(len: usize) -> EncodedPair {
        EncodedPair {
            ids: vec![1; len],
            type_ids: vec![0; len],
            truncated: false,
        }
    }

    #[test]
    fn chunks_respect_the_token_budget() {
        let pairs: Vec<EncodedPair> = [5, 9, 3, 20, 4].iter().map(|&l| pair(l)).collect();
        let order = length_order(&pairs);
        assert_eq!(order, vec![3, 1, 0, 4, 2]);
        let plan = plan_chunks(&pairs, &order, 12);
        assert_eq!(plan, vec![vec![3], vec![1], vec![0, 4, 2]]);
        for c in &plan {
            let t: usize = c.iter().map(|&m| pairs[m].len()).sum();
            assert!(t <= 12 || c.len() == 1);
        }
    }

    #[test]
    fn repack_keeps_survivor_rows_and_releases_the_rest() {
        let pairs: Vec<EncodedPair> = [2, 3, 1, 2].iter().map(|&l| pair(l)).collect();
        let dev = candle_core::Device::Cpu;
        // Two chunks: members [1, 0] (rows 0-4) and [3, 2] (rows 0-2); row values encode
        // (member * 10 + row within member).
        let mk = |members: Vec<usize>| {
            let mut rows = vec![];
            for &m in &members {
                for r in 0..pairs[m].len() {
                    rows.push((m * 10 + r) as f32);
                }
            }
            let t = Tensor::from_vec(rows.clone(), (rows.len(), 1), &dev).unwrap();
            Chunk {
                batch: pack(&pairs, &members),
                members,
                hidden: Hidden::Resident(t),
            }
        };
        let chunks = vec![mk(vec![1, 0]), mk(vec![3, 2])];
        let out = repack(chunks, |m| m != 0, &pairs, 100, None, (DType::F32, &dev)).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].members, vec![1, 3, 2]);
        let h = out[0].hidden.get(None, DType::F32, &dev).unwrap();
        let v: Vec<f32> = h.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![10.0, 11.0, 12.0, 30.0, 31.0, 20.0]);
        assert_eq!(out[0].batch.layout.spans, vec![(0, 3), (3, 2), (5, 1)]);
    }
}
