package protect

import "testing"

// Which images still carry a disk's history since a checkpoint: libvirt
// carries a checkpoint's bitmaps up into an external snapshot's new layer
// and down into the image a block commit merges into, while another disk's
// image, or a file renamed into the image's place, carries a bitmap of the
// same name that says nothing of this disk.
func TestCarriesHistory(t *testing.T) {
	a, b, s, tpl := imageID{"/i/a.qcow2", 11}, imageID{"/i/b.qcow2", 12}, imageID{"/i/a.snap", 13}, imageID{"/i/tpl.qcow2", 14}
	for _, tc := range []struct {
		name     string
		was, now []imageID
		want     bool
	}{
		{"the same image", []imageID{a}, []imageID{a}, true},
		{"an external snapshot since", []imageID{a}, []imageID{s, a}, true},
		{"its block commit since", []imageID{s, a}, []imageID{a}, true},
		{"a block pull since", []imageID{a, tpl}, []imageID{a}, true},
		{"another disk's image", []imageID{a}, []imageID{b}, false},
		{"another disk's image over a shared template", []imageID{a, tpl}, []imageID{b, tpl}, false},
		{"a file renamed into the image's place", []imageID{a}, []imageID{{a.Path, 99}}, false},
		{"a file whose inode is unknown", []imageID{{a.Path, 0}}, []imageID{a}, true},
		{"a source that is no file", []imageID{{"", 0}}, []imageID{{"", 0}}, false},
		{"nothing recorded", nil, []imageID{a}, false},
	} {
		if got := carriesHistory(tc.was, tc.now); got != tc.want {
			t.Errorf("%s: carriesHistory(%v, %v) = %v, want %v", tc.name, tc.was, tc.now, got, tc.want)
		}
	}
}
