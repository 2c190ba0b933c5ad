package virt

import (
	"strings"
	"testing"

	"libvirt.org/go/libvirtxml"
)

const productionXML = `<domain type='kvm'>
  <name>web1</name>
  <uuid>0b6c3a52-8a57-4f0c-9a55-1d1f8e6f0a01</uuid>
  <memory unit='KiB'>2097152</memory>
  <vcpu>2</vcpu>
  <os><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os>
  <devices>
    <emulator>/no/such/qemu-system-x86_64</emulator>
    <disk type='block' device='disk'><driver name='qemu' type='raw' cache='none'/><source dev='/dev/vg0/web1'/><target dev='vda' bus='virtio'/><boot order='1'/></disk>
    <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/libvirt/images/web1-data.qcow2'/><backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/></backingStore><target dev='vdb' bus='virtio'/><serial>data1</serial></disk>
    <disk type='file' device='cdrom'><source file='/isos/install.iso'/><target dev='sda' bus='sata'/><readonly/></disk>
    <interface type='bridge'><mac address='52:54:00:aa:bb:01'/><source bridge='br-prod'/><target dev='vnet3'/><model type='virtio'/></interface>
    <interface type='network'><mac address='52:54:00:aa:bb:02'/><source network='backend'/><model type='e1000e'/></interface>
    <interface type='network'><mac address='52:54:00:aa:bb:03'/><source network='storage'/><model type='virtio'/></interface>
    <serial type='file'><source path='/var/log/web1-console.log'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/web1.org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>`

func TestRecoveredXML(t *testing.T) {
	nets := map[string]string{"br-prod": "br-dr", "backend": "network:dr-backend"}
	for _, test := range []bool{false, true} {
		r := Recovered{Name: "web1", KeepUUID: !test, Dir: "/srv/lifeboat/failover/run1",
			Overlays: map[string]string{"vda": "/srv/run1/disk-0.qcow2", "vdb": "/srv/run1/disk-1.qcow2"},
			Network: func(n string) string {
				if test {
					return ""
				}
				return nets[n]
			}}
		if test {
			r.Name = "web1-lbtest-abc"
		}
		doc, dropped, err := RecoveredXML(productionXML, r)
		if err != nil {
			t.Fatal(err)
		}
		var x libvirtxml.Domain
		if err := x.Unmarshal(doc); err != nil {
			t.Fatalf("the recovered XML does not parse: %v\n%s", err, doc)
		}
		if x.Name != r.Name || (x.UUID != "") == test || x.Devices.Emulator != "" {
			t.Errorf("test %v: name %q uuid %q emulator %q", test, x.Name, x.UUID, x.Devices.Emulator)
		}
		if len(dropped) != 1 || !strings.Contains(dropped[0], "sda") {
			t.Errorf("test %v: left out %v, want the CD-ROM sda only", test, dropped)
		}
		if len(x.Devices.Disks) != 2 {
			t.Fatalf("test %v: %d disks, want vda and vdb", test, len(x.Devices.Disks))
		}
		for _, d := range x.Devices.Disks {
			if d.Source == nil || d.Source.File == nil || d.Source.File.File != r.Overlays[d.Target.Dev] || d.Driver.Type != "qcow2" || d.BackingStore != nil {
				t.Errorf("test %v: disk %s: source %+v driver %+v backing %+v, want its overlay as qcow2, no backing store", test, d.Target.Dev, d.Source, d.Driver, d.BackingStore)
			}
		}
		if d := x.Devices.Disks[0]; d.Boot == nil || d.Boot.Order != 1 || d.Driver.Cache != "none" {
			t.Errorf("test %v: vda lost its boot order or cache mode: %+v %+v", test, d.Boot, d.Driver)
		}
		if x.Devices.Disks[1].Serial != "data1" {
			t.Errorf("test %v: vdb's serial %q", test, x.Devices.Disks[1].Serial)
		}
		ifs := x.Devices.Interfaces
		if len(ifs) != 3 {
			t.Fatalf("test %v: %d interfaces, want 3", test, len(ifs))
		}
		for i, ni := range ifs {
			down := ni.Link != nil && ni.Link.State == "down"
			wantDown := test || i == 2 // storage is not mapped
			if down != wantDown || ni.Target != nil {
				t.Errorf("test %v: NIC %d link down %v (want %v), target %+v", test, i, down, wantDown, ni.Target)
			}
			if ni.MAC == nil || ni.MAC.Address == "" {
				t.Errorf("test %v: NIC %d lost its MAC", test, i)
			}
		}
		if !test {
			if s := ifs[0].Source; s == nil || s.Bridge == nil || s.Bridge.Bridge != "br-dr" {
				t.Errorf("NIC 0 on %+v, want bridge br-dr", s)
			}
			if s := ifs[1].Source; s == nil || s.Network == nil || s.Network.Network != "dr-backend" {
				t.Errorf("NIC 1 on %+v, want libvirt network dr-backend", s)
			}
		}
		if s := x.Devices.Serials[0].Source; s.File == nil || !strings.HasPrefix(s.File.Path, r.Dir+"/") {
			t.Errorf("test %v: the serial port writes %+v, want a file in the run's directory", test, s.File)
		}
		if ch := x.Devices.Channels; len(ch) != 1 || ch[0].Source.UNIX.Path != "" {
			t.Errorf("test %v: channels %+v, want the agent's, its path left to libvirt", test, ch)
		}
	}
	// The recovery site's override of vCPUs and memory.
	doc, _, err := RecoveredXML(productionXML, Recovered{Name: "web1", CPUs: 8, MemoryMiB: 16384})
	if err != nil {
		t.Fatal(err)
	}
	var o libvirtxml.Domain
	if err := o.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	if o.VCPU == nil || o.VCPU.Value != 8 || o.Memory == nil || memoryBytes(o.Memory.Value, o.Memory.Unit) != 16384<<20 {
		t.Errorf("overridden to 8 vCPUs and 16 GiB: vcpu %+v memory %+v", o.VCPU, o.Memory)
	}
	if o.Type != "kvm" {
		t.Errorf("a kvm domain on a host whose KVM runs it: type %q, want kvm", o.Type)
	}
	// On a host whose KVM cannot run it (PVM only), it runs under TCG.
	doc, _, err = RecoveredXML(productionXML, Recovered{Name: "web1", NoKVM: true})
	if err != nil {
		t.Fatal(err)
	}
	var q libvirtxml.Domain
	if err := q.Unmarshal(doc); err != nil {
		t.Fatal(err)
	}
	if q.Type != "qemu" {
		t.Errorf("a kvm domain on a host without a usable KVM: type %q, want qemu", q.Type)
	}
	// A domain without an agent channel gets one: the failover waits for it.
	doc, _, err = RecoveredXML(strings.Replace(productionXML, "name='org.qemu.guest_agent.0'", "name='org.example.other'", 1), Recovered{Name: "web1"})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(doc, "org.qemu.guest_agent.0") != 1 {
		t.Errorf("no agent channel was added:\n%s", doc)
	}
	if _, _, err := RecoveredXML("<domain", Recovered{}); err == nil || !strings.Contains(err.Error(), "does not parse") {
		t.Errorf("a broken XML: %v", err)
	}
}
