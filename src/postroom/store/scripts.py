"""The Lua scripts of the Redis adapter: every step that must be atomic is one script.

Each script touches keys of one mailbox only (one hash tag, see :mod:`postroom.store.keyspace`), so it runs in one
Redis Cluster slot.  Every script starts with "#!lua" (Redis 7 script flags, none set): with it, Redis Cluster
refuses a script that touches a key of a second slot ("Script attempted to access keys that do not hash to the same
slot"), also a key the script builds itself; without it Redis lets such a script run when both slots are on one
node.  The flags also refuse a write on a replica and under maxmemory, instead of running it there.
"""

# The index of open tickets by owner (``owned:<login>``, a set of numbers; see keyspace.owned_key): every script
# that changes a ticket's owner or state moves the number between the sets, so #away reads an agent's open tickets
# without walking every ticket.  A ticket is in its owner's set while it has an owner and is not closed.  The
# set's name depends on the owner stored in the hash, so it cannot be declared in KEYS; it shares the ticket's
# hash tag and so its cluster slot.  The scripts that call ``reindex`` are registered through with_owner_index().
OWNER_INDEX = """
local function reindex(base, n, was_owner, was_state, owner, state)
  local was = ''
  if was_owner ~= '' and was_state ~= 'closed' then was = was_owner end
  local now_owner = ''
  if owner ~= '' and state ~= 'closed' then now_owner = owner end
  if was == now_owner then return end
  if was ~= '' then redis.call('SREM', base .. 'owned:' .. was, n) end
  if now_owner ~= '' then redis.call('SADD', base .. 'owned:' .. now_owner, n) end
end
local function ticket_base(key)
  return string.match(key, '^(.*)t:(%d+)$')
end
"""


def with_owner_index(script: str) -> str:
    """``script`` with the owner index's functions defined before its body (after a ``#!`` line, which must
    stay the script's first)."""
    first, newline, rest = script.lstrip("\n").partition("\n")
    if first.startswith("#!"):
        return first + newline + OWNER_INDEX + rest
    return OWNER_INDEX + script


# Indexes one Message-ID to ticket n: the first ticket to hold an ID keeps it.  A later ticket naming the same ID
# (a stranger reusing it, on purpose or through a broken mailer) leaves the index as it is and, unless one of its
# senders takes part in the first ticket, marks the ID disputed (d:<id>): a reference to a disputed ID threads
# only a mail whose sender takes part in the ticket it names (RedisStore.lookup).
_INDEX = """
local function index(base, id, n, parts, ttl)
  local mkey = base .. 'm:' .. id
  local cur = redis.call('GET', mkey)
  if cur and cur ~= tostring(n) and redis.call('EXISTS', base .. 't:' .. cur) == 1 then
    for _, p in ipairs(parts) do
      if redis.call('SISMEMBER', base .. 'p:' .. cur, p) == 1 then return end
    end
    redis.call('SET', base .. 'd:' .. id, '1', 'EX', ttl)
    return
  end
  redis.call('SET', mkey, n, 'EX', ttl)
end
"""

# Opens a ticket: number from the mailbox counter, hash, participants and Message-ID index in one step.
# The ticket's keys depend on the number INCR returns, so they cannot be declared in KEYS; they share the
# counter's hash tag and so its cluster slot, which is what Redis Cluster needs for the script to run there.
# ARGV[3], when not empty, is the mail's own Message-ID: if it already names a ticket that one of this mail's
# senders takes part in, this is the same mail again (Postfix retrying after a lost "250", a client sending
# twice, two routes to one mailbox) and the script returns {number, that ticket's hash} instead of opening a
# second ticket; checked inside the script, so two copies arriving at once still open one ticket.
# Without the mailbox's epoch key (Redis emptied) it opens nothing: see postroom.epoch.
OPEN = (
    "#!lua\n"
    + _INDEX
    + """
local base = ARGV[1]
local ttl = tonumber(ARGV[2])
local seen_id = ARGV[3]
local nfields = tonumber(ARGV[4])
local i = 5
local fields = {}
for _ = 1, nfields do
  table.insert(fields, ARGV[i]); table.insert(fields, ARGV[i + 1]); i = i + 2
end
local nparts = tonumber(ARGV[i]); i = i + 1
local parts = {}
for _ = 1, nparts do table.insert(parts, ARGV[i]); i = i + 1 end
if redis.call('EXISTS', base .. 'epoch') == 0 then return redis.error_reply('NOEPOCH mailbox not checked') end
if seen_id ~= '' then
  local seen = redis.call('GET', base .. 'm:' .. seen_id)
  if seen then
    local t = redis.call('HGETALL', base .. 't:' .. seen)
    if #t > 0 then
      for _, p in ipairs(parts) do
        if redis.call('SISMEMBER', base .. 'p:' .. seen, p) == 1 then return {tonumber(seen), t} end
      end
    end
  end
end
local n = redis.call('INCR', KEYS[1])
local tkey = base .. 't:' .. n
local pkey = base .. 'p:' .. n
redis.call('HSET', tkey, unpack(fields))
for _, p in ipairs(parts) do redis.call('SADD', pkey, p) end
local nids = tonumber(ARGV[i]); i = i + 1
for _ = 1, nids do index(base, ARGV[i], n, parts, ttl); i = i + 1 end
local opened = redis.call('HMGET', tkey, 'owner', 'state')
reindex(base, n, '', '', opened[1] or '', opened[2] or '')
return {n}
"""
)

# Records a follow-up: index its Message-IDs (KEYS[3..] are their index keys, named again in ARGV after the base),
# add participants, bump the time, return the current hash.
TOUCH = (
    "#!lua\n"
    + _INDEX
    + """
local ttl = tonumber(ARGV[1])
local now = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSET', KEYS[1], 'updated', now)
local nparts = tonumber(ARGV[3])
local i = 4
local parts = {}
for _ = 1, nparts do redis.call('SADD', KEYS[2], ARGV[i]); table.insert(parts, ARGV[i]); i = i + 1 end
local n = ARGV[i]
local base = ARGV[i + 1]
for k = 3, #KEYS do index(base, ARGV[i + k - 1], n, parts, ttl) end
return redis.call('HGETALL', KEYS[1])
"""
)

# Sets the owner only of a ticket that exists, so a typo in a number cannot create a half ticket.
ASSIGN = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local was = redis.call('HMGET', KEYS[1], 'owner', 'state')
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'state', ARGV[2], 'updated', ARGV[3])
local base, n = ticket_base(KEYS[1])
reindex(base, n, was[1] or '', was[2] or '', ARGV[1], ARGV[2])
return redis.call('HGETALL', KEYS[1])
"""

# The claim: the first agent to answer an unowned ticket owns it; the owner answering again keeps it; anyone
# else gets the current owner back, unless forced (#takeover).  One script, so two agents answering in the
# same millisecond cannot both win.
CLAIM = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
local won = 0
if owner == '' or owner == ARGV[1] or ARGV[2] == '1' then
  local was_state = redis.call('HGET', KEYS[1], 'state') or ''
  if owner ~= ARGV[1] then
    redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owned_since', ARGV[3])
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'updated', ARGV[3])
  local base, n = ticket_base(KEYS[1])
  reindex(base, n, owner, was_state, ARGV[1], 'open')
  won = 1
end
local t = redis.call('HGETALL', KEYS[1])
table.insert(t, '_won'); table.insert(t, tostring(won))
table.insert(t, '_previous'); table.insert(t, owner)
return t
"""

# Agents' commands change several fields at once: all or nothing, and tag edits computed against the tags as
# they are now (two agents tagging at once must not lose each other's tag).  ARGV: owner, state, priority
# ("\0" leaves a field as it is), now, the "updated" time the ticket must still have ("" for any: else nothing
# changes and the script answers CHANGED), number of tags to add, the tags, then the tags to remove.
UPDATE = """#!lua
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[5] ~= '' and redis.call('HGET', KEYS[1], 'updated') ~= ARGV[5] then return 'CHANGED' end
local was = redis.call('HMGET', KEYS[1], 'owner', 'state')
local keep = string.char(0)
local now = ARGV[4]
if ARGV[1] ~= keep then
  local old = redis.call('HGET', KEYS[1], 'owner') or ''
  if old ~= ARGV[1] then redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'owned_since', now) end
end
if ARGV[2] ~= keep then redis.call('HSET', KEYS[1], 'state', ARGV[2]) end
if ARGV[3] ~= keep then redis.call('HSET', KEYS[1], 'priority', ARGV[3]) end
local tags = {}
local order = {}
for t in string.gmatch(redis.call('HGET', KEYS[1], 'tags') or '', '[^,]+') do
  if not tags[t] then tags[t] = true; table.insert(order, t) end
end
local nadd = tonumber(ARGV[6])
local i = 7
for _ = 1, nadd do
  if not tags[ARGV[i]] then tags[ARGV[i]] = true; table.insert(order, ARGV[i]) end
  i = i + 1
end
for j = i, #ARGV do tags[ARGV[j]] = nil end
local out = {}
for _, t in ipairs(order) do if tags[t] then table.insert(out, t) end end
redis.call('HSET', KEYS[1], 'tags', table.concat(out, ','), 'updated', now)
local is = redis.call('HMGET', KEYS[1], 'owner', 'state')
local base, n = ticket_base(KEYS[1])
reindex(base, n, was[1] or '', was[2] or '', is[1] or '', is[2] or '')
return redis.call('HGETALL', KEYS[1])
"""

# The agent after the one who had the last turn, skipping absent agents; a newly absent agent never costs anyone
# a turn and a returning one rejoins in place.  KEYS: last-turn key, open-count hash, then one away key per agent
# in ARGV order.
ROUND_ROBIN = """#!lua
local last = redis.call('GET', KEYS[1]) or ''
local start = 0
for i = 1, #ARGV do if ARGV[i] == last then start = i end end
for step = 1, #ARGV do
  local i = ((start + step - 1) % #ARGV) + 1
  if redis.call('EXISTS', KEYS[i + 2]) == 0 then
    redis.call('SET', KEYS[1], ARGV[i])
    redis.call('HINCRBY', KEYS[2], ARGV[i], 1)
    return ARGV[i]
  end
end
return ''
"""

# The present agent with the fewest open tickets; a tie goes to the one listed first.  KEYS: open-count hash,
# then one away key per agent in ARGV order.
LEAST_OPEN = """#!lua
local best = ''
local best_n = nil
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then
    local n = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0')
    if best_n == nil or n < best_n then best = ARGV[i]; best_n = n end
  end
end
if best ~= '' then redis.call('HINCRBY', KEYS[1], best, 1) end
return best
"""

# A released ticket lowers the count, never below zero (counts lost with Redis data may be missing).
RELEASE = """#!lua
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n < 0 then redis.call('HSET', KEYS[1], ARGV[1], 0) end
return n
"""
