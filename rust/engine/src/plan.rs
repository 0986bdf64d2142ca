//! Cutting tensors into chunks: large tensors into `chunk_size` pieces, small
//! ones packed together (grouped by item width so packs still byte-group,
//! and by size class so that a changing bias never rewrites a frozen matrix).

/// Chunking parameters.
#[derive(Clone, Copy, Debug)]
pub struct ChunkParams {
    /// Target raw size of a chunk.
    pub chunk_size: usize,
    /// Tensors below this size are packed together into shared chunks.
    pub small_threshold: usize,
    /// The "size-classes" packing rule: "tiny" small tensors (below
    /// `small_threshold / 16`: biases, norms, scalars) in packs of up to
    /// `chunk_size`, the others in packs of up to `2 * small_threshold`.
    /// Without it (the "width" rule of stores made before it), every small
    /// tensor of a width goes into packs of up to `chunk_size` (see [`plan`]).
    pub size_classes: bool,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            chunk_size: 8 << 20,
            small_threshold: 1 << 20,
            size_classes: true,
        }
    }
}

/// A slice of one tensor: `len` bytes at `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub tensor: usize,
    pub offset: usize,
    pub len: usize,
}

/// One planned chunk: pieces concatenated in order, filtered for `group`-byte items.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedChunk {
    pub pieces: Vec<Piece>,
    pub group: usize,
    pub len: usize,
}

/// Tensors below `small_threshold / TINY_DIVISOR` bytes are "tiny".
pub const TINY_DIVISOR: usize = 16;

/// Plans the chunks of tensors given as `(byte length, group width)`.
/// Deterministic: the plan depends only on the inputs.
pub fn plan(tensors: &[(usize, usize)], params: ChunkParams) -> Vec<PlannedChunk> {
    let mut chunks = Vec::new();
    // (group, pack under construction), in order of first appearance.
    let mut packs: Vec<(usize, bool, Vec<PlannedChunk>)> = Vec::new();
    for (t, &(len, group)) in tensors.iter().enumerate() {
        let group = group.max(1);
        if len == 0 {
            continue;
        }
        if len >= params.small_threshold {
            // chunks hold whole items (`group` may carry chunk::ROTATE)
            let width = (group & !crate::chunk::ROTATE).max(1);
            let step = (params.chunk_size / width).max(1) * width;
            let mut offset = 0;
            while offset < len {
                let n = step.min(len - offset);
                chunks.push(PlannedChunk {
                    pieces: vec![Piece {
                        tensor: t,
                        offset,
                        len: n,
                    }],
                    group,
                    len: n,
                });
                offset += n;
            }
            continue;
        }
        // Packs are keyed by item width, so that a rotation flag never
        // changes which tensors share a chunk (chunk ids stay what they were
        // before rotation existed; a pack takes its first tensor's flag), and
        // by size class: tiny tensors (biases, norms: what partial fine-tuning
        // trains) never share a chunk with mid-size ones (frozen matrices),
        // and a mid-size pack stays small enough that one changed tensor
        // rewrites at most `2 * small_threshold` bytes of its neighbours.
        let width = group & !crate::chunk::ROTATE;
        let tiny = params.size_classes && len < params.small_threshold / TINY_DIVISOR;
        let cap = if tiny || !params.size_classes {
            params.chunk_size
        } else {
            params.chunk_size.min(2 * params.small_threshold)
        };
        let slot = match packs
            .iter()
            .position(|(g, t, _)| *g & !crate::chunk::ROTATE == width && *t == tiny)
        {
            Some(i) => i,
            None => {
                packs.push((group, tiny, Vec::new()));
                packs.len() - 1
            }
        };
        let list = &mut packs[slot].2;
        let start_new = match list.last() {
            Some(c) => c.len + len > cap,
            None => true,
        };
        if start_new {
            list.push(PlannedChunk {
                pieces: Vec::new(),
                group,
                len: 0,
            });
        }
        let pack = list.last_mut().expect("pushed above");
        pack.pieces.push(Piece {
            tensor: t,
            offset: 0,
            len,
        });
        pack.len += len;
    }
    for (_, _, list) in packs {
        chunks.extend(list);
    }
    chunks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_tensors_split_small_ones_pack_by_group() {
        let params = ChunkParams {
            chunk_size: 100,
            small_threshold: 40,
            size_classes: true,
        };
        let plan = plan(
            &[(250, 4), (10, 4), (0, 4), (12, 2), (30, 4), (70, 4)],
            params,
        );
        let lens: Vec<usize> = plan.iter().map(|c| c.len).collect();
        assert_eq!(lens, vec![100, 100, 50, 70, 40, 12]);
        assert_eq!(plan[3].pieces[0].tensor, 5);
        assert_eq!(plan[4].pieces.len(), 2); // tensors 1 and 4 share a pack
        assert_eq!(plan[5].group, 2);
    }

    #[test]
    fn tiny_and_mid_size_tensors_pack_apart_and_mid_packs_stay_small() {
        let mut params = ChunkParams {
            chunk_size: 1 << 20,
            small_threshold: 1600, // tiny: below 100 bytes; mid packs: up to 3200
            size_classes: true,
        };
        // mid 1000, tiny 40, mid 1500, tiny 99, mid 800, mid 1000, tiny 100 (mid)
        let sizes = [1000, 40, 1500, 99, 800, 1000, 100].map(|n| (n, 4));
        let members = |params: ChunkParams| -> Vec<Vec<usize>> {
            plan(&sizes, params)
                .iter()
                .map(|c| c.pieces.iter().map(|p| p.tensor).collect())
                .collect()
        };
        // packs in order of their first tensor: mid (0, 2), tiny (1, 3), then
        // a new mid pack once 2500 + 800 would pass 3200
        assert_eq!(members(params), vec![vec![0, 2], vec![4, 5, 6], vec![1, 3]]);
        assert!(plan(&sizes, params).iter().all(|c| c.len <= 3200));
        // the "width" rule of older stores: one pack, in order
        params.size_classes = false;
        assert_eq!(members(params), vec![(0..7).collect::<Vec<_>>()]);
    }

    #[test]
    fn chunk_boundaries_respect_item_width() {
        let params = ChunkParams {
            chunk_size: 10,
            small_threshold: 1,
            size_classes: true,
        };
        for c in plan(&[(48, 8)], params) {
            assert_eq!(c.len % 8, 0);
        }
    }
}
