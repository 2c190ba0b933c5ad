package protect

import (
	"context"
	"time"

	"github.com/lifeboat-dr/lifeboat"
)

// definitionTimeout bounds reading the VM's definition: a handful of QMP or
// libvirt round trips.
const definitionTimeout = 10 * time.Second

// readDefinition is the VM's definition for this point: what the VM tells
// (read), then what its config says for the rest. Reading it never fails the
// cycle: a failure is logged and the point carries the config's part, with a
// note saying what was not read.
func (c *cycle) readDefinition(ctx context.Context, read func(context.Context) (lifeboat.Definition, error)) {
	ctx, cancel := context.WithTimeout(ctx, definitionTimeout)
	defer cancel()
	def, err := read(ctx)
	if err != nil {
		c.log.Warn("vm definition not read from the VM: the point carries the config's `definition:` only", "err", err)
		def = lifeboat.Definition{Note: "not read from the VM: " + err.Error()}
	}
	def.Fill(c.p.VM.Definition)
	if def.Empty() {
		c.def = nil
		return
	}
	if _, err := lifeboat.EncodeDefinition(&def); err != nil {
		c.log.Warn("vm definition too large: its domain XML is left out", "err", err)
		def.DomainXML = ""
		def.Note = joinNote(def.Note, "domain XML left out: "+err.Error())
	}
	c.def = &def
}

func joinNote(a, b string) string {
	if a == "" {
		return b
	}
	return a + "; " + b
}
