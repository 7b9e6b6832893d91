//! Artifact download connections (`artifacts.listen`): accept under the class cap, read
//! the request under its deadline, answer with `sendfile(2)`, close a stalled response. The
//! request side without sockets is [`crate::artifacts`].

use super::*;

/// One artifact download: read the request, then the response head, then the file by
/// `sendfile(2)` (page cache to socket, no user-space copy), then close.
pub(super) struct ArtifactConn {
    pub(super) sock: TcpStream,
    pub(super) inbuf: Vec<u8>,
    pub(super) head: Vec<u8>,
    /// The file, the next offset, and its length.
    pub(super) file: Option<(std::fs::File, u64, u64)>,
    pub(super) responding: bool,
    pub(super) closing: bool,
    pub(super) writable_armed: bool,
    /// The request's deadline, then the next stall check.
    pub(super) deadline: Instant,
    /// Bytes handed to the kernel so far, and at the last stall check.
    pub(super) sent: u64,
    pub(super) checked: u64,
}

impl Gateway {
    pub(super) fn accept_artifacts(&mut self, now: Instant) {
        let deadline = now + self.cfg.http_timeout;
        for _ in 0..self.cfg.accept_budget {
            if self.limits.artifacts_paused.is_some() {
                return;
            }
            let Some(victim) = self.room_for(Class::Artifact, now) else {
                return;
            };
            let Some(accepted) = self.listeners.artifacts.as_ref().map(|l| l.accept()) else {
                return;
            };
            match accepted {
                Ok((sock, _)) => {
                    if self.conns.len() >= self.cfg.max_connections {
                        continue;
                    }
                    if let Some(i) = victim {
                        self.evict(Class::Artifact, i, now);
                    }
                    let added = self.add_conn(sock, now, |sock| {
                        Conn::Artifact(ArtifactConn {
                            sock,
                            inbuf: Vec::new(),
                            head: Vec::new(),
                            file: None,
                            responding: false,
                            closing: false,
                            writable_armed: false,
                            deadline,
                            sent: 0,
                            checked: 0,
                        })
                    });
                    // The request must be complete by then (slowloris).
                    if let Some((idx, id)) = added {
                        self.work.timers.push(Reverse((deadline, idx, id)));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "artifact accept failed");
                    return;
                }
            }
        }
    }

    /// Reads an artifact request; once complete, decides the answer (flushed later).
    pub(super) fn service_artifact(&mut self, idx: usize, now: Instant) {
        let Some(root) = self.cfg.artifacts.as_ref().map(|a| a.root.clone()) else {
            return;
        };
        let Conn::Artifact(a) = &mut self.conns[idx].conn else {
            return;
        };
        if a.responding {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match a.sock.read(&mut buf) {
                Ok(0) => {
                    a.closing = true;
                    break;
                }
                Ok(n) => {
                    a.inbuf.extend_from_slice(&buf[..n]);
                    if a.inbuf.len() > artifacts::MAX_REQUEST_HEAD {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => {
                    a.closing = true;
                    break;
                }
            }
        }
        match artifacts::parse_request(&root, &a.inbuf) {
            artifacts::Decision::NeedMore if !a.closing => {}
            artifacts::Decision::NeedMore => {}
            artifacts::Decision::Respond { head, file } => {
                a.head = head;
                a.file = file.map(|(f, len)| (f, 0, len));
                a.responding = true;
                a.closing = false;
                a.inbuf = Vec::new();
                // From now on the timer checks that the response keeps moving.
                a.deadline = now + limits::ARTIFACT_STALL;
            }
        }
    }

    /// An artifact connection's timer: the request deadline, then the stall check.
    pub(super) fn artifact_timer(&mut self, idx: usize, now: Instant) {
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Artifact(a) = &mut slot.conn else {
            return;
        };
        if now < a.deadline {
            self.work.timers.push(Reverse((a.deadline, idx, id)));
            return;
        }
        if !a.responding {
            tracing::info!(
                conn = id,
                received = a.inbuf.len(),
                "artifact request not complete in time: cut off (slowloris)"
            );
            a.closing = true;
        } else if a.sent == a.checked {
            tracing::info!(
                conn = id,
                sent = a.sent,
                "artifact response stalled (the client stopped reading): closed"
            );
            a.closing = true;
        } else {
            a.checked = a.sent;
            a.deadline = now + limits::ARTIFACT_STALL;
            self.work.timers.push(Reverse((a.deadline, idx, id)));
            return;
        }
        self.work.touched.push(idx);
    }
}

/// Writes an artifact response until done or `WouldBlock`; returns whether bytes remain.
pub(super) fn artifact_write(a: &mut ArtifactConn) -> bool {
    use std::os::fd::AsRawFd;
    while !a.head.is_empty() {
        match a.sock.write(&a.head) {
            Ok(0) => {
                a.closing = true;
                return false;
            }
            Ok(n) => {
                a.head.drain(..n);
                a.sent += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                a.closing = true;
                return false;
            }
        }
    }
    while let Some((f, off, len)) = a.file.as_mut() {
        if *off >= *len {
            a.file = None;
            break;
        }
        let mut o = *off as libc::off_t;
        let count = (*len - *off).min(1 << 20) as usize;
        // SAFETY: both descriptors are open for the duration of the call (owned by `a`), and
        // `o` is a valid, exclusively borrowed offset; sendfile does not keep the pointer.
        let n = unsafe { libc::sendfile(a.sock.as_raw_fd(), f.as_raw_fd(), &mut o, count) };
        if n > 0 {
            *off = o as u64;
            a.sent += n as u64;
            continue;
        }
        let err = io::Error::last_os_error();
        if n < 0 && err.kind() == io::ErrorKind::WouldBlock {
            return true;
        }
        if n < 0 && err.kind() == io::ErrorKind::Interrupted {
            continue;
        }
        // 0 (file shrank under us) or a hard error: stop; the client sees a short body.
        a.closing = true;
        a.file = None;
        return false;
    }
    false
}
