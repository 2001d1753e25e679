//! Bounded name storage: an interning table for host names (SNI, DNS) that
//! flows refer to by a 32-bit id, and the DNS cache (address → name) through
//! which later flows to an address inherit the name it was resolved from.
//! Both have a fixed capacity and overwrite their oldest entries.

use shardline_shared::msg::TrafficClass;
use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;

/// Id of no name.
pub const NO_NAME: u32 = u32::MAX;

/// Interned host names, at most `cap` (≤ 65 536); ids carry a generation so
/// an id whose slot was reused resolves to nothing rather than a wrong name.
#[derive(Debug)]
pub struct NameTable {
    slots: Vec<Option<Box<str>>>,
    gens: Vec<u16>,
    map: HashMap<Box<str>, u32>,
    next: usize,
    cap: usize,
}

impl NameTable {
    pub fn new(cap: usize) -> Self {
        let cap = cap.clamp(16, 65_536);
        NameTable {
            slots: Vec::new(),
            gens: Vec::new(),
            map: HashMap::new(),
            next: 0,
            cap,
        }
    }

    /// The id of `name` (lower case), adding it if needed.
    pub fn intern(&mut self, name: &str) -> u32 {
        if let Some(&id) = self.map.get(name) {
            return id;
        }
        let slot = self.next;
        self.next = (self.next + 1) % self.cap;
        if slot == self.slots.len() {
            self.slots.push(None);
            self.gens.push(0);
        } else if let Some(old) = self.slots[slot].take() {
            self.map.remove(&old);
            // Generation 0xffff with slot 0xffff would be NO_NAME: skip it.
            self.gens[slot] = (self.gens[slot] + 1) % 0xffff;
        }
        let id = (u32::from(self.gens[slot]) << 16) | slot as u32;
        let boxed: Box<str> = name.to_ascii_lowercase().into_boxed_str();
        self.map.insert(boxed.clone(), id);
        self.slots[slot] = Some(boxed);
        id
    }

    pub fn get(&self, id: u32) -> Option<&str> {
        if id == NO_NAME {
            return None;
        }
        let slot = (id & 0xffff) as usize;
        if *self.gens.get(slot)? != (id >> 16) as u16 {
            return None;
        }
        self.slots[slot].as_deref()
    }
}

/// The class name rules give a name, per transport: a name rule may hold
/// for one protocol only (a call service's media is UDP, its downloads TCP).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NameClasses {
    pub tcp: Option<TrafficClass>,
    pub udp: Option<TrafficClass>,
    /// Any other IP protocol.
    pub other: Option<TrafficClass>,
}

impl NameClasses {
    pub fn for_proto(&self, proto: u8) -> Option<TrafficClass> {
        match proto {
            6 => self.tcp,
            17 => self.udp,
            _ => self.other,
        }
    }
}

/// Address → (name id, classes of the name rules) for names seen in DNS answers.
#[derive(Debug)]
pub struct DnsCache {
    map: HashMap<IpAddr, (u32, NameClasses)>,
    order: VecDeque<IpAddr>,
    cap: usize,
}

impl DnsCache {
    pub fn new(cap: usize) -> Self {
        DnsCache {
            map: HashMap::new(),
            order: VecDeque::new(),
            cap,
        }
    }

    pub fn insert(&mut self, addr: IpAddr, name: u32, class: NameClasses) {
        if self.cap == 0 {
            return;
        }
        if self.map.insert(addr, (name, class)).is_none() {
            self.order.push_back(addr);
            while self.order.len() > self.cap {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }

    pub fn get(&self, addr: &IpAddr) -> Option<(u32, NameClasses)> {
        if self.map.is_empty() {
            return None;
        }
        self.map.get(addr).copied()
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_generation_checked() {
        let mut t = NameTable::new(16);
        let a = t.intern("A.example");
        assert_eq!(t.get(a), Some("a.example"));
        assert_eq!(t.intern("a.example"), a);
        for i in 0..16 {
            t.intern(&format!("n{i}.example"));
        }
        assert_eq!(t.get(a), None, "slot reused: old id must not resolve");
        let mut c = DnsCache::new(2);
        for i in 0..5u8 {
            c.insert(
                IpAddr::from([10, 0, 0, i]),
                u32::from(i),
                NameClasses::default(),
            );
        }
        assert_eq!(c.len(), 2);
        assert!(c.get(&IpAddr::from([10, 0, 0, 4])).is_some());
        assert!(c.get(&IpAddr::from([10, 0, 0, 0])).is_none());
    }
}
