package daemon

import (
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"

	"gopkg.in/yaml.v3"
)

var yamlLineRE = regexp.MustCompile(`line (\d+)`)

// yamlError turns a YAML decoding error into one that names the config
// field at fault (as `vms[0].interval`, found by the line the decoder
// reports) or, for a file that is not YAML at all, the line.
func yamlError(path string, b []byte, err error) error {
	if errors.Is(err, io.EOF) {
		return fmt.Errorf("config %s: empty: start from site.example.yaml in the lifeboat repository", path)
	}
	m := yamlLineRE.FindStringSubmatch(err.Error())
	if m == nil {
		return fmt.Errorf("config %s: not valid YAML: %w", path, err)
	}
	line, _ := strconv.Atoi(m[1])
	var root yaml.Node
	if yaml.Unmarshal(b, &root) != nil {
		return fmt.Errorf("config %s: line %d: not valid YAML: %w", path, line, err)
	}
	if len(root.Content) != 1 || root.Content[0].Kind != yaml.MappingNode {
		return fmt.Errorf("config %s: line %d: not a config: the file holds fields such as `site:` and `state_dir:` (start from site.example.yaml): %w", path, line, err)
	}
	field, ok := fieldAt(&root, line)
	if !ok || field == "" {
		return fmt.Errorf("config %s: line %d: %w", path, line, err)
	}
	return fmt.Errorf("config %s: %s (line %d): %w", path, field, line, err)
}

// fieldAt is the path (`peers[1].address`) of the field written on a line
// of a YAML document: the key on that line, or, where several keys share
// it (a flow mapping such as `- {name: web1, qmp: /x}`), the item holding them.
func fieldAt(n *yaml.Node, line int) (string, bool) {
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			if p, ok := fieldAt(c, line); ok {
				return p, true
			}
		}
	case yaml.MappingNode:
		var hits []string
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if p, ok := fieldAt(v, line); ok && p != "" {
				return joinField(k.Value, p), true
			}
			if k.Line == line || v.Line == line {
				hits = append(hits, k.Value)
			}
		}
		switch len(hits) {
		case 0:
		case 1:
			return hits[0], true
		default:
			return "", true
		}
	case yaml.SequenceNode:
		for i, c := range n.Content {
			item := "[" + strconv.Itoa(i) + "]"
			if p, ok := fieldAt(c, line); ok {
				return joinField(item, p), true
			}
			if c.Line == line {
				return item, true
			}
		}
	}
	return "", false
}

func joinField(parent, child string) string {
	switch {
	case child == "":
		return parent
	case child[0] == '[':
		return parent + child
	}
	return parent + "." + child
}
