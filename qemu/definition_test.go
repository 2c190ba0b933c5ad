package qemu_test

import (
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/testenv"
	"github.com/lifeboat-dr/lifeboat/internal/testvm"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// A VM's definition is read from its real qemu-system: what the machine,
// CPUs, memory, kernel, disks and NICs were started with comes back, and a
// disk the process has no device for says only its name.
func TestDefinitionFromQEMUSystem(t *testing.T) {
	testenv.RequireTools(t, "qemu-system-x86_64", "qemu-img")
	dir := shortTempDir(t)
	ctx := testCtx(t)
	for _, n := range []string{"os", "data"} {
		if err := qemu.CreateImage(ctx, filepath.Join(dir, n+".qcow2"), "qcow2", 2<<20, "", ""); err != nil {
			t.Fatal(err)
		}
	}
	kernel := filepath.Join(dir, "vmlinuz") // QEMU loads it at start: any bytes do, the guest never runs (-S)
	if err := os.WriteFile(kernel, make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	vm := testvm.StartSystem(t, dir,
		"-smp", "3", "-m", "384",
		"-kernel", kernel, "-append", "console=ttyS0 root=/dev/vda",
		"-blockdev", `{"driver":"qcow2","node-name":"n-os","file":{"driver":"file","filename":"`+filepath.Join(dir, "os.qcow2")+`"}}`,
		"-device", "virtio-blk-pci,drive=n-os,id=vda,serial=OS-1,bootindex=1",
		"-blockdev", `{"driver":"qcow2","node-name":"n-data","file":{"driver":"file","filename":"`+filepath.Join(dir, "data.qcow2")+`"}}`,
		"-device", "virtio-scsi-pci,id=scsi0",
		"-device", "scsi-hd,drive=n-data,id=sdb,serial=DATA-2,bus=scsi0.0", // a SCSI disk
		"-netdev", "user,id=prod-lan", "-device", "virtio-net-pci,netdev=prod-lan,id=net0,mac=52:54:00:12:34:56",
		"-netdev", "user,id=backup-lan", "-device", "e1000,netdev=backup-lan,mac=52:54:00:ab:cd:ef",
	)
	got, err := vm.Monitor().Definition(ctx, []string{"vda", "sdb", "gone"})
	if err != nil {
		t.Fatal(err)
	}
	if got.Source != "qmp" || got.CPUs != 3 || got.MemoryMiB != 384 || got.Kernel != kernel || got.Append != "console=ttyS0 root=/dev/vda" {
		t.Errorf("definition %+v: want source qmp, 3 CPUs, 384 MiB, kernel %s and its command line", got, kernel)
	}
	if len(got.Machine) < len("pc-q35-") || got.Machine[:7] != "pc-q35-" {
		t.Errorf("machine %q: want the versioned q35 type (pc-q35-N.M)", got.Machine)
	}
	wantDisks := []lifeboat.DefinitionDisk{
		{Name: "vda", Device: "virtio-blk-pci", Serial: "OS-1", BootIndex: 1},
		{Name: "sdb", Device: "scsi-hd", Serial: "DATA-2"},
		{Name: "gone"},
	}
	if !reflect.DeepEqual(got.Disks, wantDisks) {
		t.Errorf("disks %+v, want %+v", got.Disks, wantDisks)
	}
	wantNICs := []lifeboat.DefinitionNIC{
		{ID: "net0", Model: "virtio-net-pci", MAC: "52:54:00:12:34:56", Network: "prod-lan"},
		{Model: "e1000", MAC: "52:54:00:ab:cd:ef", Network: "backup-lan"},
	}
	if !reflect.DeepEqual(got.NICs, wantNICs) {
		t.Errorf("nics %+v, want %+v", got.NICs, wantNICs)
	}
}

// A storage daemon has no machine: its definition is empty, without error,
// so the VM's config supplies it.
func TestDefinitionFromStorageDaemonIsEmpty(t *testing.T) {
	vm := testvm.Start(t, testvm.DiskSpec{Name: "vda", Format: "qcow2", Size: 1 << 20})
	got, err := vm.Monitor().Definition(testCtx(t), []string{"vda"})
	if err != nil {
		t.Fatal(err)
	}
	if !got.Empty() || got.Source != "" {
		t.Errorf("definition %+v from a storage daemon: want an empty one", got)
	}
}
