//! Cutting tensors into chunks: large tensors into `chunk_size` pieces, small
//! ones packed together (grouped by item width so packs still byte-group).

/// Chunking parameters.
#[derive(Clone, Copy, Debug)]
pub struct ChunkParams {
    /// Target raw size of a chunk.
    pub chunk_size: usize,
    /// Tensors below this size are packed together into shared chunks.
    pub small_threshold: usize,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            chunk_size: 8 << 20,
            small_threshold: 1 << 20,
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

/// Plans the chunks of tensors given as `(byte length, group width)`.
/// Deterministic: the plan depends only on the inputs.
pub fn plan(tensors: &[(usize, usize)], params: ChunkParams) -> Vec<PlannedChunk> {
    let mut chunks = Vec::new();
    // (group, pack under construction), in order of first appearance.
    let mut packs: Vec<(usize, Vec<PlannedChunk>)> = Vec::new();
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
        // Packs are keyed by item width alone, so that a rotation flag never
        // changes which tensors share a chunk (chunk ids stay what they were
        // before rotation existed); a pack takes its first tensor's flag.
        let width = group & !crate::chunk::ROTATE;
        let slot = match packs
            .iter()
            .position(|(g, _)| *g & !crate::chunk::ROTATE == width)
        {
            Some(i) => i,
            None => {
                packs.push((group, Vec::new()));
                packs.len() - 1
            }
        };
        let list = &mut packs[slot].1;
        let start_new = match list.last() {
            Some(c) => c.len + len > params.chunk_size,
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
    for (_, list) in packs {
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
    fn chunk_boundaries_respect_item_width() {
        let params = ChunkParams {
            chunk_size: 10,
            small_threshold: 1,
        };
        for c in plan(&[(48, 8)], params) {
            assert_eq!(c.len % 8, 0);
        }
    }
}
