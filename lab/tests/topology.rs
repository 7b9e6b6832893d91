//! The topology itself: addresses, reachability, multicast, commands, counters, scale.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::time::Duration;

use fleetcast_lab::{host_addr, Lab, LabConfig};

fn own_interfaces() -> BTreeSet<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect()
}

#[test]
fn unicast_commands_and_counters_stay_inside() {
    let before = own_interfaces();
    let lab = Lab::new(LabConfig::hosts(3)).unwrap();
    assert_eq!(
        own_interfaces(),
        before,
        "the lab must not add interfaces to the test's namespace"
    );

    // A real process inside host 1 sees the host's address on eth0 and nothing else.
    let out = lab
        .host(1)
        .command("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains("eth0") && text.contains("10.77.0.2/16"),
        "{text}"
    );
    assert!(!text.contains("10.77.0.1/"), "{text}");

    let rx = lab.host(2).udp_socket(7000).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = lab.host(0).udp_socket(0).unwrap();
    let c0 = lab.host(0).counters().unwrap();
    let c2 = lab.host(2).counters().unwrap();
    for i in 0..10u8 {
        tx.send_to(&[i; 100], SocketAddrV4::new(lab.host(2).addr(), 7000))
            .unwrap();
    }
    let mut buf = [0u8; 200];
    for i in 0..10u8 {
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!((n, buf[0]), (100, i));
        assert_eq!(from.ip(), std::net::IpAddr::V4(host_addr(0)));
    }
    let d0 = lab.host(0).counters().unwrap().since(&c0);
    let d2 = lab.host(2).counters().unwrap().since(&c2);
    // 10 datagrams of 100 bytes + 8 UDP + 20 IP + 14 Ethernet, plus possibly ARP.
    assert!(d0.tx_packets >= 10 && d0.tx_bytes >= 10 * 142, "{d0:?}");
    assert!(d2.rx_packets >= 10 && d2.rx_bytes >= 10 * 142, "{d2:?}");
    // Host 1 was not addressed: no unicast datagram reached it (ARP broadcasts may have).
    assert!(lab.host(1).counters().unwrap().rx_bytes < 10 * 142);
    drop(lab);
    assert_eq!(own_interfaces(), before);
}

#[test]
fn multicast_from_one_host_reaches_all_others() {
    const GROUP: Ipv4Addr = Ipv4Addr::new(239, 77, 0, 1);
    const N: usize = 8;
    const COUNT: u32 = 50;
    let lab = Lab::new(LabConfig::hosts(N)).unwrap();
    let receivers: Vec<_> = (1..N)
        .map(|i| {
            let h = lab.host(i);
            let s = h.udp_socket(6000).unwrap();
            s.join_multicast_v4(&GROUP, &h.addr()).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(500)))
                .unwrap();
            s
        })
        .collect();
    let tx = lab.host(0).udp_socket(0).unwrap();
    tx.set_multicast_ttl_v4(1).unwrap();
    tx.set_multicast_loop_v4(false).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = receivers
            .iter()
            .map(|rx| {
                s.spawn(move || {
                    let mut seen = BTreeSet::new();
                    let mut buf = [0u8; 64];
                    while let Ok((n, from)) = rx.recv_from(&mut buf) {
                        assert_eq!(n, 4);
                        assert_eq!(from.ip(), std::net::IpAddr::V4(host_addr(0)));
                        seen.insert(u32::from_be_bytes(buf[..4].try_into().unwrap()));
                        if seen.len() == COUNT as usize {
                            break;
                        }
                    }
                    seen.len()
                })
            })
            .collect();
        for i in 0..COUNT {
            tx.send_to(&i.to_be_bytes(), SocketAddrV4::new(GROUP, 6000))
                .unwrap();
            std::thread::sleep(Duration::from_millis(1));
        }
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(
                h.join().unwrap(),
                COUNT as usize,
                "host {} missed multicast datagrams",
                i + 1
            );
        }
    });
}

/// Builds 64 hosts, reports the set-up time and checks reachability across the lab.
#[test]
fn sixty_four_hosts() {
    let lab = Lab::new(LabConfig::hosts(64)).unwrap();
    eprintln!("lab set-up, 64 hosts: {:?}", lab.setup_time());
    for (a, b) in [(0, 63), (63, 0), (17, 42), (5, 31)] {
        let rx = lab.host(b).udp_socket(7100).unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let tx = lab.host(a).udp_socket(0).unwrap();
        tx.send_to(b"ping", SocketAddrV4::new(lab.host(b).addr(), 7100))
            .unwrap();
        let mut buf = [0u8; 8];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ping");
        assert_eq!(from.ip(), std::net::IpAddr::V4(lab.host(a).addr()));
    }
}

#[test]
fn addresses_follow_the_documented_plan() {
    assert_eq!(host_addr(0), Ipv4Addr::new(10, 77, 0, 1));
    assert_eq!(host_addr(249), Ipv4Addr::new(10, 77, 0, 250));
    assert_eq!(host_addr(250), Ipv4Addr::new(10, 77, 1, 1));
    assert!(Lab::new(LabConfig::hosts(0)).is_err());
}

#[test]
fn jumbo_frames_cross_the_hub_unfragmented() {
    let lab = Lab::new(LabConfig {
        mtu: 9000,
        ..LabConfig::hosts(2)
    })
    .unwrap();
    let out = lab
        .host(1)
        .command("ip")
        .args(["-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("mtu 9000"), "{text}");
    // An 8900-byte datagram arrives as one frame: one packet on the receiver's interface.
    let rx = lab.host(1).udp_socket(7000).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let tx = lab.host(0).udp_socket(0).unwrap();
    let to = SocketAddrV4::new(host_addr(1), 7000);
    let mut buf = [0u8; 9000];
    // The first one also resolves the neighbour (ARP); count the second alone.
    tx.send_to(&[7u8; 8900], to).unwrap();
    assert_eq!(rx.recv_from(&mut buf).unwrap().0, 8900);
    let before = lab.host(1).counters().unwrap();
    tx.send_to(&[7u8; 8900], to).unwrap();
    let (n, _) = rx.recv_from(&mut buf).unwrap();
    assert_eq!(n, 8900);
    let after = lab.host(1).counters().unwrap();
    assert_eq!(after.rx_packets - before.rx_packets, 1);
}
