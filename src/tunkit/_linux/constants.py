"""Kernel constants of the system calls, spelled as the kernel spells them, grouped by header.

The one copy in Python: every module under ``_linux/`` takes them from here.
"""

from __future__ import annotations

from typing import Final

# <linux/if_tun.h>: ioctl requests on a /dev/net/tun descriptor.
# _IOW('T', nr, int) = 0x40000000 | 4 << 16 | ord('T') << 8 | nr; _IOR uses 0x80000000.
TUNSETIFF: Final = 0x400454CA  # _IOW('T', 202, int)
TUNSETPERSIST: Final = 0x400454CB  # _IOW('T', 203, int)
TUNSETOWNER: Final = 0x400454CC  # _IOW('T', 204, int)
TUNSETGROUP: Final = 0x400454CE  # _IOW('T', 206, int)
TUNGETFEATURES: Final = 0x800454CF  # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD: Final = 0x400454D0  # _IOW('T', 208, unsigned int)
TUNGETIFF: Final = 0x800454D2  # _IOR('T', 210, unsigned int)
TUNGETVNETHDRSZ: Final = 0x800454D7  # _IOR('T', 215, int)
TUNSETVNETHDRSZ: Final = 0x400454D8  # _IOW('T', 216, int)
TUNSETQUEUE: Final = 0x400454D9  # _IOW('T', 217, int); takes a struct ifreq

# <linux/if_tun.h>: ifr_flags of TUNSETIFF / TUNGETIFF.
IFF_TUN: Final = 0x0001
IFF_TAP: Final = 0x0002
IFF_NAPI: Final = 0x0010
IFF_MULTI_QUEUE: Final = 0x0100
IFF_ATTACH_QUEUE: Final = 0x0200  # TUNSETQUEUE only
IFF_DETACH_QUEUE: Final = 0x0400  # TUNSETQUEUE only
IFF_PERSIST: Final = 0x0800
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
IFF_TUN_EXCL: Final = 0x8000

# <linux/if_tun.h>: TUNSETOFFLOAD bits, what the reader of the device accepts.
TUN_F_CSUM: Final = 0x01  # partial checksums (VIRTIO_NET_HDR_F_NEEDS_CSUM)
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
TUN_F_TSO_ECN: Final = 0x08
TUN_F_UFO: Final = 0x10
TUN_F_USO4: Final = 0x20  # Linux 6.2 and later
TUN_F_USO6: Final = 0x40  # Linux 6.2 and later

# <linux/virtio_net.h>: struct virtio_net_hdr and its constants are a packet
# layout, read and written by pure code: they live in tunkit/_offload/vnet.py
# (and, for the C twins, in _speedups/tunkit.h), not here.

# <linux/if.h>
IFNAMSIZ: Final = 16  # including the terminating NUL: names have at most 15 bytes
IFF_UP: Final = 0x1  # net_device_flags, in ifinfomsg.ifi_flags
IFF_POINTOPOINT: Final = 0x10

# <linux/if_addr.h>
IFA_F_NODAD: Final = 0x02

# <linux/netlink.h>
NETLINK_ROUTE: Final = 0
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02

# <linux/rtnetlink.h>
RTMGRP_LINK: Final = 0x1
RTM_NEWLINK: Final = 16
RTM_DELLINK: Final = 17
RTM_GETLINK: Final = 18

# <linux/if_link.h>: attributes of an ifinfomsg.
IFLA_IFNAME: Final = 3
IFLA_MTU: Final = 4
IFLA_LINKINFO: Final = 18  # nested: IFLA_INFO_*
IFLA_GSO_MAX_SEGS: Final = 40
IFLA_INFO_KIND: Final = 1  # "tun" for TUN and TAP devices
IFLA_INFO_DATA: Final = 2  # nested: IFLA_TUN_* for kind "tun"
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

# <linux/if_link.h>: IFLA_TUN_*, what tun_fill_info() reports (Linux 4.15 and later).
IFLA_TUN_OWNER: Final = 1  # u32 uid; absent when the device has no owner
IFLA_TUN_GROUP: Final = 2  # u32 gid; absent when the device has no group
IFLA_TUN_TYPE: Final = 3  # u8: IFF_TUN or IFF_TAP
IFLA_TUN_PI: Final = 4  # u8
IFLA_TUN_VNET_HDR: Final = 5  # u8
IFLA_TUN_PERSIST: Final = 6  # u8
IFLA_TUN_MULTI_QUEUE: Final = 7  # u8
IFLA_TUN_NUM_QUEUES: Final = 8  # u32
IFLA_TUN_NUM_DISABLED_QUEUES: Final = 9  # u32

# <linux/udp.h>: options at level SOL_UDP (17). Python 3.11's socket module lacks them.
UDP_SEGMENT: Final = 103  # setsockopt/cmsg: send one buffer as datagrams of this size (GSO)
UDP_GRO: Final = 104  # setsockopt: coalesce received datagrams; cmsg: their size

# <linux/in.h>, <linux/in6.h>: the path MTU of a connected socket (getsockopt).
IP_MTU: Final = 14  # level IPPROTO_IP
IPV6_MTU: Final = 24  # level IPPROTO_IPV6

# <linux/sockios.h>: a descriptor of a socket's network namespace (CAP_NET_ADMIN).
SIOCGSKNS: Final = 0x894C

# <asm-generic/socket.h>: buffer sizes above net.core.[rw]mem_max (CAP_NET_ADMIN).
SO_SNDBUFFORCE: Final = 32
SO_RCVBUFFORCE: Final = 33

# <linux/sched.h>
CLONE_NEWNET: Final = 0x40000000

# <linux/nsfs.h>: ioctls on a namespace descriptor (Linux 4.11 and later).
NS_GET_NSTYPE: Final = 0xB703  # _IO(0xb7, 0x3): returns the CLONE_NEW* of the namespace

# <linux/prctl.h>
PR_SET_PDEATHSIG: Final = 1  # prctl option: the signal a child gets when its parent dies

# <linux/mount.h> / <sys/mount.h>
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_SHARED: Final = 1 << 20
MNT_DETACH: Final = 0x2
