package daemon

import (
	"os"
	"reflect"
	"regexp"
	"strings"
	"testing"
)

// topFields are the config's top-level keys, read from Config's yaml tags, so
// a field added to Config is known here without a change.
func topFields() map[string]bool {
	out := map[string]bool{}
	t := reflect.TypeOf(Config{})
	for i := range t.NumField() {
		if tag, _, _ := strings.Cut(t.Field(i).Tag.Get("yaml"), ","); tag != "" && tag != "-" {
			out[tag] = true
		}
	}
	return out
}

var (
	fieldHeadRE = regexp.MustCompile(`^([a-z_]+)[\[. :(]`)
	yamlFieldRE = regexp.MustCompile(`^(.+?) \(line \d+\): `)
)

// FuzzConfig feeds arbitrary bytes to the config parser. Properties: no
// panic, and every error names the file and then the field at fault (a
// top-level key, maybe followed by the path below it), or the line of a
// file that is not YAML, or says that it is empty or not YAML. The seeds are
// site.example.yaml and the configs of the tests; they run in every `go test`.
func FuzzConfig(f *testing.F) {
	example, err := os.ReadFile("../site.example.yaml")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(example)
	f.Add([]byte(goodConfig))
	f.Add([]byte(goodConfig + "groups:\n  - {name: g, vms: [web1, db1]}\n  - name: h\n    vms: [x]\n"))
	f.Add([]byte(strings.Replace(goodConfig, "interval: 30s", "interval: often", 1)))
	f.Add([]byte("site: a\nstate_dir: /s\nkeep: many\n"))
	f.Add([]byte("site: [\n"))
	f.Add([]byte{})
	fields := topFields()
	const path = "/etc/lifeboat/site.yaml"
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := parseConfig(path, in)
		if err == nil {
			if c == nil {
				t.Fatal("no config and no error")
			}
			return
		}
		msg := err.Error()
		rest, ok := strings.CutPrefix(msg, "config "+path+": ")
		if !ok {
			t.Fatalf("error %q does not start with the file", msg)
		}
		if strings.HasPrefix(rest, "line ") || strings.HasPrefix(rest, "empty") || strings.HasPrefix(rest, "not valid YAML") {
			return
		}
		if m := yamlFieldRE.FindStringSubmatch(rest); m != nil {
			// A decoding error: the path names a known field, or the key the
			// decoder complains about (unknown, or written twice).
			path := m[1]
			key := strings.TrimRight(path, "[]0123456789")
			key = key[strings.LastIndexAny(key, ".]")+1:]
			if h := fieldHeadRE.FindStringSubmatch(path + " "); h != nil && fields[h[1]] || strings.Contains(rest[len(m[0]):], key) {
				return
			}
			t.Fatalf("error %q names neither a config field nor the key at fault", msg)
		}
		if m := fieldHeadRE.FindStringSubmatch(rest); m == nil || !fields[m[1]] {
			t.Fatalf("error %q names no config field", msg)
		}
	})
}
