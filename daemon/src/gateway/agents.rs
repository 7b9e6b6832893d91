//! Agent connections: accept under the class caps, read under the budget, feed the
//! session core and drain it in its documented order; session events become fleet inputs.

use super::*;

/// Ciphertext read per iteration from a connection not authenticated yet (the handshake and
/// an `Enrol` need a few KiB).
pub(super) const PRE_AUTH_READ_BUDGET: usize = 16 * 1024;

pub(super) struct AgentConn {
    pub(super) tls: TlsConn,
    pub(super) session: Option<GatewaySession>,
    pub(super) device: Option<DeviceId>,
    pub(super) key_hash: [u8; 32],
    pub(super) plain: Vec<u8>,
    pub(super) out: Vec<u8>,
    /// The peer is gone or the session closed: flush and drop.
    pub(super) closing: bool,
    pub(super) writable_armed: bool,
    /// Which layers the first bytes picked (transport ladder).
    pub(super) sniff: ladder::Sniffing,
    /// The source address (for a long-poll relay's loopback connection: the address of the
    /// agent's HTTP requests).
    pub(super) peer: std::net::IpAddr,
    /// TLS authenticated a client certificate of this CA, or (a long-poll request) the
    /// relay it names carries such a session: counts as an agent, not as an unauthenticated
    /// connection.
    pub(super) authenticated: bool,
    /// The long-poll relay this (loopback) connection comes from.
    pub(super) relay: Option<(usize, ConnId)>,
}

impl Gateway {
    pub(super) fn accept_agents(&mut self, now: Instant) {
        for _ in 0..self.cfg.accept_budget {
            if self.limits.agents_paused.is_some() {
                return;
            }
            // Room for one more unauthenticated connection, or leave the backlog alone.
            let Some(victim) = self.room_for(Class::Unauthenticated, now) else {
                return;
            };
            match self.accept_one() {
                Ok((sock, peer)) => {
                    if self.conns.len() >= self.cfg.max_connections {
                        drop(sock);
                        tracing::warn!("connection limit reached; refusing");
                        continue;
                    }
                    if let Some(i) = victim {
                        self.evict(Class::Unauthenticated, i, now);
                    }
                    let (peer, relay) = self.relays.origin(peer);
                    let _ = sock.set_nodelay(true);
                    let tls = match rustls::ServerConnection::new(self.server_cfg.clone()) {
                        Ok(t) => t,
                        Err(e) => {
                            tracing::error!(error = %e, "TLS setup failed");
                            continue;
                        }
                    };
                    let wrap = |sock| {
                        Conn::Agent(Box::new(AgentConn {
                            tls: TlsConn::new(sock, tls),
                            session: None,
                            device: None,
                            key_hash: [0; 32],
                            plain: Vec::new(),
                            out: Vec::new(),
                            closing: false,
                            writable_armed: false,
                            sniff: ladder::Sniffing::Outer,
                            peer,
                            authenticated: false,
                            relay,
                        }))
                    };
                    let Some((idx, id)) = self.add_conn(sock, now, wrap) else {
                        continue;
                    };
                    // Handshake timeout: the session core's hello timer starts at handshake
                    // end; until then this timer bounds a silent TLS client.
                    self.work
                        .timers
                        .push(Reverse((now + self.cfg.session.hello_timeout, idx, id)));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    return;
                }
            }
        }
        // Budget exhausted: more may be waiting; come back next iteration.
        self.work.ready.push_back(usize::MAX);
    }

    /// Accepts from the agent listener, then from the extra one.
    pub(super) fn accept_one(&self) -> io::Result<(TcpStream, SocketAddr)> {
        match (self.listeners.agent.accept(), &self.listeners.extra) {
            (Err(e), Some(l)) if e.kind() == io::ErrorKind::WouldBlock => l.accept(),
            (r, _) => r,
        }
    }

    /// Reads and feeds one agent connection. Returns true if the read budget cut it short.
    pub(super) fn service_agent(&mut self, idx: usize, now: Instant) -> bool {
        if let Some(more) = self.ladder_pre_read(idx, now) {
            return more;
        }
        let http_timeout = self.cfg.http_timeout;
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return false;
        };
        // Before authentication a peer needs a handshake and one small Enrol: read little.
        let budget = if c.authenticated {
            self.cfg.read_budget
        } else {
            self.cfg.read_budget.min(PRE_AUTH_READ_BUDGET)
        };
        let outcome = match c.tls.read(&mut c.plain, budget) {
            Ok(o) => o,
            Err(e) => {
                tracing::info!(conn = id, error = %e, "connection closed: TLS/socket error");
                let _ = c.tls.flush();
                c.closing = true;
                if let Some(dev) = c.device {
                    self.inputs.push(Input::Disconnected {
                        conn: id,
                        device: Some(dev),
                        reason: e.to_string(),
                    });
                }
                return false;
            }
        };
        let mut relay_certified = None;
        if c.session.is_none()
            && c.tls.handshake_done()
            && ladder::inner_ready(c, idx, id, now, http_timeout, &mut self.work.timers)
        {
            let (device, key_hash) = peer_identity(&c.tls.tls);
            c.key_hash = key_hash;
            if device.is_some() {
                if !self.limits.authenticate(c, id) {
                    c.closing = true;
                    return false;
                }
                relay_certified = c.relay;
            }
            c.session = Some(GatewaySession::new(now, self.cfg.session, device));
        }
        if let Some(s) = c.session.as_mut() {
            if !c.plain.is_empty() {
                if let Err(e) = s.handle_input(now, &c.plain) {
                    tracing::info!(conn = id, error = %e, "session closed: protocol error");
                }
                c.plain.clear();
            }
        }
        if !c.authenticated && c.session.is_some() {
            // The core took its input: nothing buffered before authentication outlives its
            // use (before the session, `plain` holds an Upgrade head, bounded by its limit).
            c.plain = Vec::new();
        }
        if outcome.eof {
            c.closing = true;
        }
        if let Some((ri, rid)) = relay_certified {
            // The long-poll requests of this relay now carry an authenticated session.
            if let Some(Slot {
                id,
                conn: Conn::Relay(r),
            }) = self.conns.get_mut(ri)
            {
                if *id == rid {
                    r.authenticated = true;
                }
            }
        }
        self.drain_session(idx, now);
        outcome.wire_bytes >= budget
    }

    /// Drains one session core in its documented order.
    pub(super) fn drain_session(&mut self, idx: usize, now: Instant) {
        let slot = &mut self.conns[idx];
        let id = slot.id;
        let Conn::Agent(c) = &mut slot.conn else {
            return;
        };
        let Some(s) = c.session.as_mut() else { return };
        transmit(s, &mut c.tls, &mut c.out, &mut c.closing, id, now);
        let mut refused = false;
        while let Some(ev) = s.poll_event() {
            if matches!(ev, GatewayEvent::Enrol(_)) && !self.limits.enrol.try_take(c.peer, now) {
                if let Some(left_out) = self.limits.enrol_log.due(now) {
                    tracing::warn!(conn = id, peer = %c.peer, left_out, "enrolment refused: too many failed enrolments from this address (rate limit)");
                }
                let _ = s.close(
                    fleetcast_wire::CloseCode::OVERLOADED,
                    "too many failed enrolments from this address: retry later",
                );
                refused = true;
                continue;
            }
            let dist = self.mcast.dist.as_mut();
            if let Some(input) =
                event_to_input(id, c.key_hash, &mut c.device, ev, self.wall_ms, dist)
            {
                self.inputs.push(input);
            }
        }
        if refused {
            // The Close frame.
            transmit(s, &mut c.tls, &mut c.out, &mut c.closing, id, now);
        }
        if s.is_closed() {
            c.closing = true;
        }
        if let Some(t) = s.poll_timeout() {
            self.work.timers.push(Reverse((t, idx, id)));
        }
        self.work.touched.push(idx);
    }
}

/// Moves what a session core has to send into its TLS connection.
pub(super) fn transmit(
    s: &mut GatewaySession,
    tls: &mut TlsConn,
    out: &mut Vec<u8>,
    closing: &mut bool,
    id: ConnId,
    now: Instant,
) {
    while s.poll_transmit(now, out).is_some() {}
    if !out.is_empty() {
        if let Err(e) = tls.write_plain(out) {
            tracing::warn!(conn = id, error = %e, "TLS write failed");
            *closing = true;
        }
        out.clear();
        out.shrink_to(256);
    }
}

/// The device id and key hash of an authenticated client, if it presented a certificate.
pub(super) fn peer_identity(tls: &rustls::ServerConnection) -> (Option<u64>, [u8; 32]) {
    let Some(cert) = tls.peer_certificates().and_then(|c| c.first()) else {
        return (None, [0; 32]);
    };
    let Some(id) = crate::pki::device_identity(cert) else {
        return (None, [0; 32]);
    };
    let key_hash = webpki::EndEntityCert::try_from(cert)
        .map(|ee| sha256(ee.subject_public_key_info().as_ref()))
        .unwrap_or([0; 32]);
    (Some(id.id), key_hash)
}

/// A device's result as the store keeps it: the message itself, and when it arrived.
fn received(r: fleetcast_wire::CommandResult<'_>, wall_ms: u64) -> fleetcast_store::Received {
    fleetcast_store::Received {
        result: r.into_owned(),
        at_ms: wall_ms,
    }
}

/// Turns a session event into fleet input (or handles it here when the fleet has no part).
pub(super) fn event_to_input(
    conn: ConnId,
    key_hash: [u8; 32],
    device: &mut Option<DeviceId>,
    ev: GatewayEvent,
    wall_ms: u64,
    dist: Option<&mut Distributor>,
) -> Option<Input> {
    match ev {
        GatewayEvent::Hello {
            device_id, frame, ..
        } => {
            *device = Some(DeviceId(device_id));
            let Message::Hello(h) = frame.message() else {
                return None;
            };
            let last = h.last.map(|l| LastSeen {
                seq: l.seq,
                attempt: l.attempt,
                executing: l.executing,
                result: l.result.map(|r| received(r, wall_ms)),
            });
            Some(Input::Hello {
                conn,
                device: DeviceId(device_id),
                key_hash,
                boot_id: h.boot_id,
                last,
                transport: ladder::rung_of(&h.agent_version),
            })
        }
        GatewayEvent::Enrol(frame) => {
            let Message::Enrol(e) = frame.message() else {
                return None;
            };
            Some(Input::Enrol {
                conn,
                token: e.token.to_vec(),
                name: e.name.to_string(),
                spki: e.spki.to_vec(),
            })
        }
        GatewayEvent::Result { seq, frame, .. } => {
            let Message::Result(r) = frame.message() else {
                return None;
            };
            Some(Input::Result {
                conn,
                device: (*device)?,
                seq,
                attempt: r.attempt,
                result: received(r, wall_ms),
            })
        }
        GatewayEvent::DuplicateResult { .. } => None,
        GatewayEvent::Report(frame) => {
            let Message::Report(r) = frame.message() else {
                return None;
            };
            Some(Input::Report {
                conn,
                device: (*device)?,
                report: r.into_owned(),
            })
        }
        GatewayEvent::RebootStarting(rs) => Some(Input::RebootStarting {
            conn,
            device: (*device)?,
            seq: rs.seq,
            boot_id: rs.boot_id,
        }),
        GatewayEvent::RebootComplete { seq, frame, .. } => {
            let Message::RebootComplete(rc) = frame.message() else {
                return None;
            };
            Some(Input::RebootComplete {
                conn,
                device: (*device)?,
                seq,
                attempt: rc.result.attempt,
                report: rc.report.into_owned(),
                result: received(rc.result, wall_ms),
            })
        }
        GatewayEvent::Completion(frame) => {
            let Message::Completion(c) = frame.message() else {
                return None;
            };
            let verified = c.outcome == fleetcast_wire::Outcome::Verified;
            Some(Input::Completion {
                conn,
                device: (*device)?,
                task: c.task_id,
                verified,
                reason: if verified {
                    String::new()
                } else {
                    format!("{}: {}", c.outcome, c.reason)
                },
            })
        }
        GatewayEvent::TransferStatus(st) => {
            // A device's first status (sent as it joins) makes it count as ready.
            if let (Some(d), Some(dev)) = (dist, *device) {
                d.receiver_ready(st.task_id, dev.0);
            }
            Some(Input::TransferProgress {
                conn,
                device: (*device)?,
                task: st.task_id,
                received: st.received,
                total: st.total,
            })
        }
        GatewayEvent::TaskAsk(ask) => {
            let mut have = fleetcast_store::BlockSet::new();
            for r in ask.have.as_slice() {
                have.insert(r.start, r.start.saturating_add(r.len));
            }
            Some(Input::TaskAsk {
                conn,
                device: (*device)?,
                task: ask.task_id,
                total: ask.total,
                have,
            })
        }
        GatewayEvent::Nack(_) => {
            tracing::debug!(
                conn,
                "NACK over the control session ignored (NACKs use UDP)"
            );
            None
        }
        GatewayEvent::Closed(info) => {
            let code = info
                .code
                .name()
                .map_or_else(|| info.code.0.to_string(), String::from);
            tracing::info!(conn, %code, reason = %info.reason, by_peer = info.by_peer, "session closed");
            device.map(|d| Input::Disconnected {
                conn,
                device: Some(d),
                reason: info.reason,
            })
        }
    }
}
