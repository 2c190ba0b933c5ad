package qemu

import "encoding/json"

// DiskArgs returns the qemu-storage-daemon arguments that open an image as a
// disk: a format node named node over a file node, and a writable NBD export
// (its id and its name are node too) through which a stand-in guest writes to
// it. The export's id is the disk's name (see Monitor.Disks).
func DiskArgs(node, image, format string) []string {
	file := map[string]any{"driver": "file", "node-name": node + "-file", "filename": image}
	return []string{
		"--blockdev", jsonArg(map[string]any{"driver": format, "node-name": node, "file": file}),
		"--export", jsonArg(map[string]any{"type": "nbd", "id": node, "node-name": node, "name": node, "writable": true}),
	}
}

// jsonArg writes an option in its JSON form, which needs no escaping of commas in paths.
func jsonArg(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
