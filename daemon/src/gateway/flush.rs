//! The end of an iteration: write what each touched connection has pending (asking for
//! `WRITABLE` only while bytes wait), and remove the connections that are done.

use super::*;

impl Gateway {
    pub(super) fn flush_touched(&mut self) {
        let mut touched = std::mem::take(&mut self.work.touched);
        touched.sort_unstable();
        touched.dedup();
        for idx in touched.drain(..) {
            let Some(slot) = self.conns.get_mut(idx) else {
                continue;
            };
            let token = Tok::Conn(idx).encode();
            let done = match &mut slot.conn {
                Conn::Agent(c) if matches!(c.sniff, ladder::Sniffing::Plain(_)) => {
                    ladder::flush_plain(c, self.poll.registry(), token)
                }
                Conn::Relay(r) => {
                    let pending = ladder::flush_relay(r);
                    arm_writable(
                        self.poll.registry(),
                        &mut r.sock,
                        token,
                        pending,
                        &mut r.writable_armed,
                    );
                    ladder::relay_done(r)
                }
                Conn::Agent(c) => {
                    if let Err(e) = c.tls.flush() {
                        tracing::debug!(error = %e, "write failed");
                        c.closing = true;
                    }
                    if c.closing && c.tls.wants_write() && !c.tls.tls.is_handshaking() {
                        // Give a final Close frame a chance: it is already in rustls's buffer.
                        let _ = c.tls.flush();
                    }
                    let pending = c.tls.wants_write();
                    if !c.closing {
                        arm_writable(
                            self.poll.registry(),
                            &mut c.tls.sock,
                            token,
                            pending,
                            &mut c.writable_armed,
                        );
                    }
                    if !pending {
                        c.plain.shrink_to_fit();
                    }
                    c.closing
                }
                Conn::Admin(a) => {
                    while !a.out.is_empty() {
                        match a.sock.write(&a.out) {
                            Ok(0) => break,
                            Ok(n) => {
                                a.out.drain(..n);
                            }
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(_) => {
                                a.closing = true;
                                break;
                            }
                        }
                    }
                    let pending = !a.out.is_empty();
                    arm_writable(
                        self.poll.registry(),
                        &mut a.sock,
                        token,
                        pending,
                        &mut a.writable_armed,
                    );
                    a.closing && !pending
                }
                Conn::Artifact(a) => {
                    let pending = artifact_write(a);
                    arm_writable(
                        self.poll.registry(),
                        &mut a.sock,
                        token,
                        pending,
                        &mut a.writable_armed,
                    );
                    a.closing || (a.responding && !pending)
                }
            };
            if done {
                self.remove_conn(idx);
            }
        }
        self.work.touched = touched;
    }

    /// Removes connection `idx` (flushing what TLS can still send) and tells the fleet when
    /// it carried a device's session.
    pub(super) fn remove_conn(&mut self, idx: usize) {
        let Some(slot) = self.conns.try_remove(idx) else {
            return;
        };
        self.limits.counts.remove(Class::of(&slot.conn));
        match slot.conn {
            Conn::Agent(mut c) => {
                if !matches!(c.sniff, ladder::Sniffing::Plain(_)) {
                    c.tls.tls.send_close_notify();
                    let _ = c.tls.flush();
                }
                ladder::discard_input(&mut c.tls.sock);
                let _ = self.poll.registry().deregister(&mut c.tls.sock);
                if let Some(dev) = c.device {
                    self.inputs.push(Input::Disconnected {
                        conn: slot.id,
                        device: Some(dev),
                        reason: "connection closed".into(),
                    });
                }
            }
            Conn::Admin(mut a) => {
                let _ = self.poll.registry().deregister(&mut a.sock);
            }
            Conn::Artifact(mut a) => {
                let _ = self.poll.registry().deregister(&mut a.sock);
            }
            Conn::Relay(mut r) => {
                let _ = self.poll.registry().deregister(&mut r.sock);
                self.relays.forget(&r);
            }
        }
    }
}
