package failover

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"time"

	"github.com/lifeboat-dr/lifeboat"
	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/protect"
	"github.com/lifeboat-dr/lifeboat/virt"
)

// A point of a libvirt domain carries the domain's inactive XML. Where the
// recovery site's config names a libvirtd (Manager.Libvirt), such a VM is
// started as a libvirt domain from that XML, so virsh, virt-manager and the
// rest of the site's tools see it: the same domain, its disks on the run's
// overlays, its NICs on the mapped networks (or link down), paused until the
// failover's checkpoint (the dirty bitmap a failback reads) is made. A real
// failover defines it under its own name and UUID; a test runs a transient
// domain under another name, gone when it stops.

// domainName is the name of the run's domain.
func domainName(doc string, r *Run) (string, error) {
	name, err := virt.DomainName(doc)
	if err != nil {
		return "", err
	}
	if r.Test {
		name += "-lbtest-" + r.ID[strings.LastIndexByte(r.ID, '-')+1:]
	}
	return name, nil
}

// startDomain starts r's VM, paused, as a libvirt domain from def's XML.
func (m *Manager) startDomain(ctx context.Context, r *Run, pt lifeboat.Point, def *lifeboat.Definition, images []string) error {
	name, err := domainName(def.DomainXML, r)
	if err != nil {
		return fmt.Errorf("vm %q: %w", r.VM, err)
	}
	r.Libvirt, r.Domain = cmp.Or(m.Libvirt, virt.DefaultURI), name
	c, err := virt.Dial(ctx, r.Libvirt)
	if err != nil {
		return fmt.Errorf("vm %q: the recovery site's libvirt: %w", r.VM, err)
	}
	defer c.Close()
	if exists, err := c.Exists(ctx, name); err != nil {
		return fmt.Errorf("vm %q: %w", r.VM, err)
	} else if exists {
		r.Domain = "" // not ours: never removed by this run
		return fmt.Errorf("vm %q: libvirt at %s already has a domain named %q, which a failover would replace: "+
			"undefine or rename it (`virsh -c %s undefine %s`) if it is a leftover, then fail over again", r.VM, r.Libvirt, name, r.Libvirt, name)
	}
	// QEMU runs as libvirt's user: it must reach the overlays and the
	// point's chain. libvirt gives it the files while the domain runs (and
	// gives them back after); lifeboat lets it pass its directories.
	own := filepath.Dir(m.Dir)
	r.ImageDirs = images
	for _, dir := range append([]string{r.Dir}, images...) {
		// Others may pass these directories from now on, so the images in
		// them are made readable by their owner only (qemu-img creates them
		// 0644); libvirt gives them to QEMU's user while the domain runs.
		if err := fsutil.PrivateFiles(dir); err != nil {
			return fmt.Errorf("vm %q: %w", r.VM, err)
		}
		if err := fsutil.LetOthersPass(dir, own); err != nil {
			return fmt.Errorf("vm %q: %w", r.VM, err)
		}
	}
	overlays := map[string]string{}
	for _, d := range r.disks {
		overlays[d.Name] = r.Overlays[d.Name]
	}
	doc, dropped, err := virt.RecoveredXML(def.DomainXML, virt.Recovered{
		Name: name, KeepUUID: !r.Test, Overlays: overlays, Dir: r.Dir,
		CPUs: m.Overrides[r.VM].CPUs, MemoryMiB: m.Overrides[r.VM].MemoryMiB,
		NoKVM: pvmOnly(),
		Network: func(net string) string {
			if r.Test {
				return ""
			}
			return m.Networks[net]
		},
	})
	if err != nil {
		return fmt.Errorf("vm %q: %w", r.VM, err)
	}
	if len(dropped) > 0 {
		m.log().Warn("the recovered domain leaves out what was not replicated", "vm", r.VM, "domain", name, "left_out", strings.Join(dropped, ", "))
	}
	if err := os.WriteFile(filepath.Join(r.Dir, "domain.xml"), []byte(doc), 0o600); err != nil {
		return err
	}
	s, err := c.StartRecovered(ctx, doc, !r.Test)
	if err != nil {
		return fmt.Errorf("vm %q: starting libvirt domain %q from point %d (its XML: %s): %w", r.VM, name, r.Point, filepath.Join(r.Dir, "domain.xml"), err)
	}
	r.PID, r.Agent, r.QMP = s.PID, s.Agent, ""
	r.Console = "virsh -c " + r.Libvirt + " console " + name
	if logs, _ := filepath.Glob(filepath.Join(r.Dir, "console-*.log")); len(logs) > 0 {
		slices.Sort(logs)
		r.Console = logs[0]
	}
	if ok, err := m.startCheckpoints(ctx, s.Domain, r, pt); err != nil || ok {
		return err
	}
	targets := make([]string, 0, len(r.disks))
	for _, d := range r.disks {
		targets = append(targets, d.Name)
	}
	if err := s.CreateCheckpoint(ctx, Bitmap, targets); err != nil {
		return fmt.Errorf("vm %q: change tracking on the overlays (libvirt checkpoint %s of domain %q): %w", r.VM, Bitmap, name, err)
	}
	return nil
}

// startCheckpoints starts, on a real failover's paused domain, the
// generations a failback reads (Run.Generations, for the VM's owner) and
// folds (Run.Home, this site's own) as two checkpoints of lifeboat's,
// hidden among those of the failback cycles' work directory, whose libvirt
// cycles continue from them. false: the point names no lineage or the VM
// had no owner (the plain Bitmap checkpoint then).
func (m *Manager) startCheckpoints(ctx context.Context, dom *virt.Domain, r *Run, pt lifeboat.Point) (bool, error) {
	if err := m.nameGenerations(r, pt); err != nil || len(r.Generations) == 0 || r.Test {
		r.Generations, r.Home = nil, nil
		return false, err
	}
	owner, _, err := m.Store.Owner(r.VM)
	if err != nil {
		return false, err
	}
	lineages := map[string]string{}
	for _, d := range pt.Disks {
		if d.Lineage != "" && r.Generations[d.Name] != "" {
			lineages[d.Name] = d.Lineage
		}
	}
	workDir := filepath.Join(r.Dir, "failback")
	back, home := protect.HomeCheckpoint(owner.Site, pt.ID), protect.HomeCheckpoint(m.Site, pt.ID)
	for _, c := range []struct{ name, peer string }{{back, owner.Site}, {home, m.Site}} {
		if err := protect.StartCheckpoint(ctx, dom, workDir, c.name, c.peer, pt.ID, lineages); err != nil {
			return false, fmt.Errorf("vm %q: change tracking on the overlays (libvirt checkpoint %s of domain %q): %w", r.VM, c.name, dom.Name, err)
		}
	}
	r.Generations, r.Home = map[string]string{}, map[string]string{}
	for disk := range lineages {
		r.Generations[disk], r.Home[disk] = back, home
	}
	return true, nil
}

// resumeDomain runs the paused domain's CPUs.
func resumeDomain(ctx context.Context, r *Run) error {
	return r.WithDomain(ctx, func(d *virt.Domain) error { return d.Resume(ctx) })
}

// removeDomain powers the run's domain off and undefines it (its bitmaps
// go with the overlays).
func removeDomain(ctx context.Context, r *Run) error {
	c, err := virt.Dial(ctx, r.Libvirt)
	if err != nil {
		return fmt.Errorf("vm %q: the recovery site's libvirt: %w", r.VM, err)
	}
	defer c.Close()
	if err := c.Remove(ctx, r.Domain); err != nil {
		return err
	}
	return takeBackImages(r)
}

// takeBackImages gives lifeboat back the point's images that libvirt gave
// QEMU's user for the run (it hands back the top image, not the backing
// chain), unless another run of the VM under libvirt still reads them: a
// QEMU of another domain, running as the same user, must not read them.
func takeBackImages(r *Run) error {
	others, err := liveDomainRuns(r)
	if err != nil || others {
		return err
	}
	uid, gid := os.Getuid(), os.Getgid()
	for _, dir := range r.ImageDirs {
		ents, err := os.ReadDir(dir)
		if err != nil {
			return err
		}
		for _, e := range ents {
			fi, err := e.Info()
			if err != nil {
				continue
			}
			if st, ok := fi.Sys().(*syscall.Stat_t); ok && (int(st.Uid) != uid || int(st.Gid) != gid) {
				if err := os.Lchown(filepath.Join(dir, e.Name()), uid, gid); err != nil {
					return fmt.Errorf("vm %q: taking back image %s from QEMU's user: %w", r.VM, e.Name(), err)
				}
			}
		}
	}
	return nil
}

// liveDomainRuns reports whether another run of r's VM runs under libvirt.
func liveDomainRuns(r *Run) (bool, error) {
	ents, err := os.ReadDir(filepath.Dir(r.Dir))
	if err != nil {
		return false, err
	}
	for _, e := range ents {
		if e.Name() == filepath.Base(r.Dir) {
			continue
		}
		b, err := os.ReadFile(filepath.Join(filepath.Dir(r.Dir), e.Name(), "run.json"))
		if err != nil {
			continue
		}
		var o Run
		if json.Unmarshal(b, &o) == nil && o.VM == r.VM && o.Domain != "" && o.Alive() {
			return true, nil
		}
	}
	return false, nil
}

// WithDomain calls f with the libvirt domain the run's VM runs as.
func (r *Run) WithDomain(ctx context.Context, f func(d *virt.Domain) error) error {
	if err := virt.WithDomain(ctx, r.Libvirt, r.Domain, f); err != nil {
		return fmt.Errorf("vm %q: the recovery site's libvirt: %w", r.VM, err)
	}
	return nil
}

// waitDomainAgent asks libvirt until the guest agent answers, within ctx.
func waitDomainAgent(ctx context.Context, r *Run) error {
	return r.WithDomain(ctx, func(d *virt.Domain) error {
		for {
			actx, cancel := context.WithTimeout(ctx, 2*time.Second)
			err := d.AgentAnswers(actx)
			cancel()
			if err == nil {
				return nil
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("%w (last: %v)", context.Cause(ctx), err)
			case <-time.After(200 * time.Millisecond):
			}
		}
	})
}
