//! The ipset codec and socket replies, without a kernel (see ipset.rs).

use super::*;
use proptest::prelude::*;

/// Builds a LIST reply message the way the kernel does (for decode tests).
fn list_reply(seq: u32, name: &str, entries: &[(IpAddr, Option<&str>)]) -> Vec<u8> {
    let mut b = MsgBuilder::new(IPSET_CMD_LIST, 2 /* NLM_F_MULTI */, seq);
    b.put_str(IPSET_ATTR_SETNAME, name);
    b.put_str(IPSET_ATTR_TYPENAME, TYPE_HASH_IP);
    b.put_u8(IPSET_ATTR_REVISION, 6);
    b.put_u8(IPSET_ATTR_FAMILY, libc::AF_INET as u8);
    b.begin_nested(IPSET_ATTR_DATA);
    b.put_u32_be(IPSET_ATTR_HASHSIZE, 1024);
    b.end_nested();
    b.begin_nested(IPSET_ATTR_ADT);
    for (ip, c) in entries {
        b.begin_nested(IPSET_ATTR_DATA);
        b.begin_nested(IPSET_ATTR_IP);
        match ip {
            IpAddr::V4(a) => b.put(IPSET_ATTR_IPADDR_IPV4 | NLA_F_NET_BYTEORDER, &a.octets()),
            IpAddr::V6(a) => b.put(IPSET_ATTR_IPADDR_IPV6 | NLA_F_NET_BYTEORDER, &a.octets()),
        }
        b.end_nested();
        if let Some(c) = c {
            b.put_str(IPSET_ATTR_COMMENT, c);
        }
        b.end_nested();
    }
    b.end_nested();
    b.finish()
}

fn ack(seq: u32, code: i32) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&36u32.to_ne_bytes());
    v.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
    v.extend_from_slice(&0u16.to_ne_bytes());
    v.extend_from_slice(&seq.to_ne_bytes());
    v.extend_from_slice(&0u32.to_ne_bytes());
    v.extend_from_slice(&code.to_ne_bytes());
    v.extend_from_slice(&[0u8; 16]); // the echoed request header
    v
}

#[test]
fn create_message_layout() {
    let m6 = encode_create(7, "ztunnel-pods-ips6", 6, Family::V6).expect("valid");
    let msgs = parse_messages(&m6).expect("parses");
    let Reply::Data { attrs, .. } = msgs[0].reply else {
        panic!("not data")
    };
    assert_eq!(
        decode_set_msg(attrs).expect("decodes").family,
        Some(libc::AF_INET6 as u8)
    );
    let m = encode_create(7, "ztunnel-pods-ips", 6, Family::V4).expect("valid");
    assert_eq!(read_u32(&m, 0), Some(m.len() as u32));
    assert_eq!(read_u16(&m, 4), Some((6 << 8) | 2));
    assert_eq!(read_u32(&m, 8), Some(7));
    assert_eq!(m.len() % 4, 0);
    let msgs = parse_messages(&m).expect("parses");
    let Reply::Data { cmd, attrs } = msgs[0].reply else {
        panic!("not data")
    };
    assert_eq!(cmd, IPSET_CMD_CREATE);
    let c = decode_set_msg(attrs).expect("decodes");
    assert_eq!(c.setname.as_deref(), Some("ztunnel-pods-ips"));
    assert_eq!(c.typename.as_deref(), Some("hash:ip"));
    assert_eq!(c.revision, Some(6));
    assert_eq!(c.family, Some(libc::AF_INET as u8));
    // DATA is nested and holds the comment flag in network order.
    let data = nlas(attrs)
        .flatten()
        .find(|(t, _)| *t == IPSET_ATTR_DATA)
        .expect("DATA")
        .1;
    let flags = nlas(data)
        .flatten()
        .find(|(t, _)| *t == IPSET_ATTR_CADT_FLAGS)
        .expect("flags")
        .1;
    assert_eq!(flags, &IPSET_FLAG_WITH_COMMENT.to_be_bytes());
}

#[test]
fn nested_and_byteorder_flags_are_set() {
    let m = encode_adt(1, "s", Ipv4Addr::new(10, 244, 1, 5).into(), Some("uid")).expect("valid");
    let body = &m[NLMSG_HDRLEN + NFGENMSG_LEN..];
    let raw: Vec<u16> = {
        let mut v = Vec::new();
        let mut b = body;
        while let (Some(len), Some(ty)) = (read_u16(b, 0), read_u16(b, 2)) {
            v.push(ty);
            b = &b[align4(len as usize).min(b.len())..];
        }
        v
    };
    assert!(raw.contains(&(IPSET_ATTR_DATA | NLA_F_NESTED)), "{raw:?}");
}

#[test]
fn adt_round_trip() {
    let v6: IpAddr = "fd00:10:244:1::5".parse().expect("address");
    let m = encode_adt(3, "set6", v6, Some("pod-uid-6")).expect("valid");
    let msgs = parse_messages(&m).expect("parses");
    let Reply::Data { attrs, .. } = msgs[0].reply else {
        panic!("not data")
    };
    let data = nlas(attrs)
        .flatten()
        .find(|(t, _)| *t == IPSET_ATTR_DATA)
        .expect("DATA")
        .1;
    assert_eq!(
        decode_entry(data).expect("ok"),
        Some((v6, "pod-uid-6".to_string()))
    );
    let ip = IpAddr::from(Ipv4Addr::new(10, 244, 1, 5));
    let m = encode_adt(3, "set", ip, Some("pod-uid-1")).expect("valid");
    let msgs = parse_messages(&m).expect("parses");
    let Reply::Data { cmd, attrs } = msgs[0].reply else {
        panic!("not data")
    };
    assert_eq!(cmd, IPSET_CMD_ADD);
    let data = nlas(attrs)
        .flatten()
        .find(|(t, _)| *t == IPSET_ATTR_DATA)
        .expect("DATA")
        .1;
    assert_eq!(
        decode_entry(data).expect("ok"),
        Some((ip, "pod-uid-1".to_string()))
    );
    let d = encode_adt(4, "set", ip, None).expect("valid");
    let msgs = parse_messages(&d).expect("parses");
    let Reply::Data { cmd, .. } = msgs[0].reply else {
        panic!("not data")
    };
    assert_eq!(cmd, IPSET_CMD_DEL);
}

#[test]
fn list_reply_decodes_entries_and_comments() {
    let a = IpAddr::from(Ipv4Addr::new(10, 0, 0, 1));
    let b: IpAddr = "fd00::2".parse().expect("address");
    let mut buf = list_reply(9, "set", &[(a, Some("one")), (b, None)]);
    buf.extend(ack(9, 0)); // stands in for DONE here
    let msgs = parse_messages(&buf).expect("parses");
    assert_eq!(msgs.len(), 2);
    let Reply::Data { attrs, .. } = msgs[0].reply else {
        panic!("not data")
    };
    let c = decode_set_msg(attrs).expect("decodes");
    assert_eq!(c.entries, vec![(a, "one".to_string()), (b, String::new())]);
    assert_eq!(msgs[1].reply, Reply::Ack);
}

#[test]
fn error_codes_are_positive() {
    let buf = ack(5, -IPSET_ERR_EXIST);
    let msgs = parse_messages(&buf).expect("parses");
    assert_eq!(
        msgs[0],
        Msg {
            seq: 5,
            reply: Reply::Error(IPSET_ERR_EXIST)
        }
    );
    let buf = ack(5, i32::MIN);
    let msgs = parse_messages(&buf).expect("parses");
    assert_eq!(msgs[0].reply, Reply::Error(i32::MAX));
}

#[test]
fn truncated_buffers_never_panic() {
    let ips: Vec<(IpAddr, Option<&str>)> = (0..20u8)
        .map(|i| {
            (
                Ipv4Addr::new(10, 0, 0, i).into(),
                if i % 2 == 0 { Some("c") } else { None },
            )
        })
        .collect();
    let full = list_reply(1, "set", &ips);
    for cut in 0..full.len() {
        let part = &full[..cut];
        if let Ok(msgs) = parse_messages(part) {
            for m in msgs {
                if let Reply::Data { attrs, .. } = m.reply {
                    let _ = decode_set_msg(attrs);
                }
            }
        }
        // And the attribute block alone, cut anywhere.
        let attrs = full.get(NLMSG_HDRLEN + NFGENMSG_LEN..cut).unwrap_or(&[]);
        let _ = decode_set_msg(attrs);
    }
}

#[test]
fn garbage_lengths_are_errors() {
    // nlmsg_len larger than the buffer.
    let mut m = encode_destroy(1, "s").expect("valid");
    m[0] = 0xff;
    assert!(parse_messages(&m).is_err());
    // nlmsg_len smaller than a header.
    let mut m = encode_destroy(1, "s").expect("valid");
    m[0..4].copy_from_slice(&4u32.to_ne_bytes());
    assert!(parse_messages(&m).is_err());
    // Attribute with length 0 must not loop forever.
    assert!(decode_set_msg(&[0, 0, 2, 0, 1, 2, 3, 4]).is_err());
    // Attribute longer than its container.
    assert!(decode_set_msg(&[200, 0, 2, 0, 1, 2, 3, 4]).is_err());
}

#[test]
fn names_and_comments_are_checked() {
    assert!(encode_destroy(1, "").is_err());
    assert!(encode_destroy(1, &"x".repeat(32)).is_err());
    assert!(encode_destroy(1, &"x".repeat(31)).is_ok());
    assert!(encode_adt(1, "s", Ipv4Addr::LOCALHOST.into(), Some(&"c".repeat(256))).is_err());
    assert!(encode_adt(1, "s", Ipv4Addr::LOCALHOST.into(), Some("a\0b")).is_err());
}

proptest! {
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Ok(msgs) = parse_messages(&bytes) {
            for m in msgs {
                if let Reply::Data { attrs, .. } = m.reply {
                    let _ = decode_set_msg(attrs);
                }
            }
        }
        let _ = decode_set_msg(&bytes);
    }

    #[test]
    fn list_round_trip(entries in proptest::collection::btree_map(any::<u32>(), "[a-z0-9-]{0,40}", 0..50)) {
        let v: Vec<(IpAddr, Option<&str>)> =
            entries.iter().map(|(ip, c)| (IpAddr::from(Ipv4Addr::from(*ip)), Some(c.as_str()))).collect();
        let buf = list_reply(1, "set", &v);
        let msgs = parse_messages(&buf).expect("parses");
        let Reply::Data { attrs, .. } = msgs[0].reply else { panic!("not data") };
        let c = decode_set_msg(attrs).expect("decodes");
        let want: Vec<(IpAddr, String)> = entries.iter().map(|(ip, c)| (IpAddr::from(Ipv4Addr::from(*ip)), c.clone())).collect();
        prop_assert_eq!(c.entries, want);
    }
}
