//! Output capture: the last [`MAX_OUTPUT`](fleetcast_wire::msg::limits::MAX_OUTPUT) bytes of
//! a command's output in a fixed ring, so memory is bounded however much a program prints.

/// The last `cap` bytes written to it, in a fixed ring (memory never exceeds `cap`).
#[derive(Debug, Clone)]
pub struct TailBuffer {
    buf: Vec<u8>,
    cap: usize,
    /// Index of the oldest byte once the ring is full (0 until then).
    start: usize,
    total: u64,
}

impl TailBuffer {
    /// An empty buffer keeping the last `cap` bytes.
    pub fn new(cap: usize) -> TailBuffer {
        TailBuffer {
            buf: Vec::new(),
            cap,
            start: 0,
            total: 0,
        }
    }

    /// Appends bytes, dropping the oldest beyond the capacity.
    pub fn push(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if data.len() >= self.cap {
            self.buf.clear();
            self.buf.extend_from_slice(&data[data.len() - self.cap..]);
            self.start = 0;
            return;
        }
        if self.buf.len() < self.cap {
            let take = (self.cap - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            data = &data[take..];
        }
        while !data.is_empty() {
            let n = (self.cap - self.start).min(data.len());
            self.buf[self.start..self.start + n].copy_from_slice(&data[..n]);
            self.start = (self.start + n) % self.cap;
            data = &data[n..];
        }
    }

    /// The kept bytes, oldest first, as two slices.
    pub fn as_slices(&self) -> (&[u8], &[u8]) {
        (&self.buf[self.start..], &self.buf[..self.start])
    }

    /// The kept bytes, oldest first.
    pub fn to_vec(&self) -> Vec<u8> {
        let (a, b) = self.as_slices();
        [a, b].concat()
    }

    /// Bytes ever pushed (more than kept if the output was truncated).
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::*;
    use fleetcast_wire::msg::limits::MAX_OUTPUT;
    use fleetcast_wire::StepStatus;

    #[test]
    fn tail_buffer_keeps_the_last_bytes() {
        let mut t = TailBuffer::new(8);
        t.push(b"abc");
        assert_eq!(t.to_vec(), b"abc");
        t.push(b"defgh");
        assert_eq!(t.to_vec(), b"abcdefgh");
        t.push(b"ij");
        assert_eq!(t.to_vec(), b"cdefghij");
        t.push(b"klmnopq"); // wraps around the ring end
        assert_eq!(t.to_vec(), b"jklmnopq");
        t.push(b"0123456789");
        assert_eq!(t.to_vec(), b"23456789");
        t.push(b"x");
        assert_eq!(t.to_vec(), b"3456789x");
        assert_eq!(t.total(), 3 + 5 + 2 + 7 + 10 + 1);
        // Byte-by-byte agrees with a naive tail.
        let mut t = TailBuffer::new(5);
        let mut all = Vec::new();
        for i in 0..37u8 {
            let piece = vec![i; usize::from(i % 4)];
            t.push(&piece);
            all.extend_from_slice(&piece);
            assert_eq!(t.to_vec(), all[all.len().saturating_sub(5)..]);
        }
    }

    #[test]
    fn output_keeps_only_the_tail() {
        // 1000 lines of 100 bytes = 100 KB.
        let script = r#"i=0; while [ $i -lt 1000 ]; do printf "%099d\n" $i; i=$((i+1)); done"#;
        let done = run(&job(0, vec![sh(script)]), &ExecConfig::default());
        assert_eq!(statuses(&done), [StepStatus::Ok]);
        let expected: String = (0..1000).map(|i| format!("{i:099}\n")).collect();
        assert_eq!(expected.len(), 100_000);
        assert_eq!(done.result.output.len(), MAX_OUTPUT);
        assert_eq!(
            *done.result.output,
            expected.as_bytes()[expected.len() - MAX_OUTPUT..]
        );
    }
}
