package protect

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"

	"github.com/lifeboat-dr/lifeboat/internal/fsutil"
	"github.com/lifeboat-dr/lifeboat/qemu"
)

// DiskImage is where a protected disk's data lives on this host, as the VM's
// QEMU had it open at the last committed cycle: a failback writes into it
// once the VM is stopped. The production site records it itself, so that
// nothing another site says decides which files a failback writes.
type DiskImage struct {
	Name   string `json:"name"`
	File   string `json:"file"`
	Format string `json:"format"` // "qcow2" or "raw"
}

// imagesFile is the record of a VM's disk images, in its WorkDir.
const imagesFile = "images.json"

// imagesOf is the images of the disks a cycle resolved, those a failback can
// open (qcow2 or raw on a local file); ok is false when some disk's is not.
func imagesOf(nodes []qemu.BlockNode) (images []DiskImage, ok bool) {
	ok = true
	for _, n := range nodes {
		if (n.Driver != "qcow2" && n.Driver != "raw") || !filepath.IsAbs(n.Filename) {
			ok = false
			continue
		}
		images = append(images, DiskImage{Name: n.Name, File: n.Filename, Format: n.Driver})
	}
	return images, ok
}

// saveImages records images in dir, unless the record says so already. An
// empty list is recorded too: an earlier record would name images the VM's
// disks no longer read.
func saveImages(dir string, images []DiskImage) error {
	if dir == "" {
		return nil
	}
	if old, err := ReadImages(dir); err == nil && slices.Equal(old, images) {
		return nil
	}
	b, err := json.MarshalIndent(images, "", "  ")
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(dir, imagesFile), b, 0o600)
}

// recordedFiles is, by disk name, the image each disk's node read at the VM's
// last committed cycle here: empty when there is no record.
func recordedFiles(workDir string) map[string]string {
	files := map[string]string{}
	if workDir == "" {
		return files
	}
	images, err := ReadImages(workDir)
	if err != nil {
		return files
	}
	for _, im := range images {
		files[im.Name] = im.File
	}
	return files
}

// ReadImages is the record of a VM's disk images in its work directory, as
// its last committed cycle found them.
func ReadImages(workDir string) ([]DiskImage, error) {
	b, err := os.ReadFile(filepath.Join(workDir, imagesFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("no record of the VM's disk images in %s: it has had no committed cycle with this lifeboat", workDir)
	}
	if err != nil {
		return nil, err
	}
	var images []DiskImage
	if err := json.Unmarshal(b, &images); err != nil {
		return nil, fmt.Errorf("the record of the VM's disk images %s: %w", filepath.Join(workDir, imagesFile), err)
	}
	return images, nil
}
