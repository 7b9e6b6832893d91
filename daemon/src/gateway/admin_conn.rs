//! Admin socket connections: JSON request lines in, JSON answer lines out; lines over the
//! size limit are refused whole.

use super::*;

pub(super) struct AdminConn {
    pub(super) sock: UnixStream,
    pub(super) inbuf: Vec<u8>,
    pub(super) out: Vec<u8>,
    pub(super) closing: bool,
    pub(super) writable_armed: bool,
    /// A line over [`admin::MAX_REQUEST`] was refused: its bytes are dropped up to its end.
    pub(super) skipping: bool,
}

impl Gateway {
    pub(super) fn accept_admin(&mut self, now: Instant) {
        loop {
            match self.listeners.admin.accept() {
                Ok((mut sock, _)) => {
                    if !self.limits.has_room(Class::Admin) {
                        // Its descriptors are reserved; more clients than that at once is a
                        // local client holding connections: say so instead of queueing.
                        let _ = sock.write(b"{\"ok\":false,\"error\":\"too many admin connections at once: retry\"}\n");
                        continue;
                    }
                    self.add_conn(sock, now, |sock| {
                        Conn::Admin(AdminConn {
                            sock,
                            inbuf: Vec::new(),
                            out: Vec::new(),
                            closing: false,
                            writable_armed: false,
                            skipping: false,
                        })
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    return;
                }
            }
        }
    }

    pub(super) fn service_admin(&mut self, idx: usize, id: ConnId) -> bool {
        let Conn::Admin(a) = &mut self.conns[idx].conn else {
            return false;
        };
        let more = admin_read(a);
        let mut local = Vec::new();
        while let Some(line) = admin_next_line(a, id) {
            match serde_json::from_slice::<Request>(&line) {
                // Metrics and backup need the loop's own state (see `local`); every other
                // request, push included, is the fleet's.
                Ok(req @ (Request::Metrics | Request::Backup { .. })) => local.push(req),
                Ok(req) => self.inputs.push(Input::Admin { conn: id, req }),
                Err(e) => {
                    let resp = Response::err(format!("malformed request: {e}"));
                    push_json_line(&mut a.out, &resp);
                }
            }
        }
        for req in local {
            self.serve_local(idx, req);
        }
        more
    }
}

/// Reads what an admin client sent until `WouldBlock`, or until about one line limit is
/// buffered (then returns `true`: more may be waiting, serve the lines first). While a
/// refused line is being skipped its bytes are dropped up to its newline.
fn admin_read(a: &mut AdminConn) -> bool {
    let mut buf = [0u8; 16 * 1024];
    while !a.closing {
        if a.inbuf.len() > admin::MAX_REQUEST {
            return true;
        }
        match a.sock.read(&mut buf) {
            Ok(0) => a.closing = true,
            Ok(n) => {
                let mut data = &buf[..n];
                if a.skipping {
                    match data.iter().position(|b| *b == b'\n') {
                        Some(p) => {
                            a.skipping = false;
                            data = &data[p + 1..];
                        }
                        None => continue,
                    }
                }
                a.inbuf.extend_from_slice(data);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => a.closing = true,
        }
    }
    false
}

/// The next complete admin request line. A line longer than [`admin::MAX_REQUEST`] is
/// refused whole — none of it is parsed (a prefix cut at the limit could itself be a valid
/// request) — with an error line to the client; the lines around it are served as usual.
fn admin_next_line(a: &mut AdminConn, id: ConnId) -> Option<Vec<u8>> {
    let refuse = |a: &mut AdminConn| {
        tracing::warn!(
            conn = id,
            limit = admin::MAX_REQUEST,
            "admin request line over the size limit: refused, not executed"
        );
        let resp = Response::err(format!(
            "request line longer than {} bytes: refused, nothing was done",
            admin::MAX_REQUEST
        ));
        push_json_line(&mut a.out, &resp);
    };
    loop {
        match a.inbuf.iter().position(|b| *b == b'\n') {
            Some(nl) if nl <= admin::MAX_REQUEST => return Some(a.inbuf.drain(..=nl).collect()),
            Some(nl) => {
                a.inbuf.drain(..=nl);
                refuse(a);
            }
            None if a.inbuf.len() > admin::MAX_REQUEST => {
                a.inbuf = Vec::new();
                a.skipping = true;
                refuse(a);
                return None;
            }
            None => return None,
        }
    }
}
