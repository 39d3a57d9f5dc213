-- The lane fencing guard (loaded by cbctl/core/backends/redis/guard.py; contract in docs/backends.md).
-- KEYS: 1 fence, 2 lane stream, [3 wf state, 4 wf history, 5 wf applied]  (apply ops only)
-- ARGV: 1 "<op> <mode>"  op: fence|ack|apply|apply_ack, mode: off|observe|enforce
--       2 token
--       3 "<group> <delete acked 0|1> <history maxlen, 0 = unbounded> <retention s, 0 = none> <node id>"
--       4 lane, 5 workflow_id, 6 task_id, 7 task type, 8 stream entry id ('' = none)
--       9 the update as JSON (history 'data', types kept as given)
--       10 the update as a JSON array of strings [field, value, ...] (state hash fields)
--       11 "<finished 0|1> <versions the caller publishes, comma-separated, or ->"
-- Returns ONE string "<decision> <seq> <fence> <applied 0|1> <history id or -> <versions to
-- publish for this seq, comma-separated, or ->".
local op, mode = string.match(ARGV[1], '^(%S+) (%S+)$')
local token_s = ARGV[2]
local token = tonumber(token_s)
local fence_s = redis.call('GET', KEYS[1]) or '0'
local fence = tonumber(fence_s)
if token > fence then
  -- a newer owner: raise the bar before anything else, so every older token is now stale
  redis.call('SET', KEYS[1], token_s)
  fence = token
  fence_s = token_s
end
if op == 'fence' then
  return 'allow 0 ' .. fence_s .. ' 0 - -'
end
local decision = 'allow'
if token < fence and mode ~= 'off' then
  if mode == 'enforce' then
    return 'deny 0 ' .. fence_s .. ' 0 - -'
  end
  decision = 'would_deny'
end
local group, delete_acked, maxlen, retention, node = string.match(ARGV[3], '^(%S+) ([01]) (%d+) (%d+) (.*)$')
local lane, workflow_id, task_id, task_type, entry_id = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local seq = '0'
local applied = '0'
local hid = '-'
local pubv = '-'
if op == 'apply' or op == 'apply_ack' then
  local finished, want = string.match(ARGV[11], '^([01]) (%S+)$')
  local prev = redis.call('HGET', KEYS[5], task_id)
  local pub = redis.call('HGET', KEYS[3], 'pub') or ''
  if prev then
    -- already applied (redelivery, retry after a lost reply): write nothing, report its seq
    seq = prev
  else
    seq = string.format('%d', redis.call('HINCRBY', KEYS[3], 'seq', 1))
    if want ~= '-' then
      -- the caller publishes: versions whose publishing has not begun begin at this seq
      local added = ''
      for v in string.gmatch(want, '%d+') do
        if not string.find(',' .. pub, ',' .. v .. ':', 1, true) then
          added = added .. ',' .. v .. ':' .. seq
        end
      end
      if added ~= '' then
        if pub == '' then pub = string.sub(added, 2) else pub = pub .. added end
        redis.call('HSET', KEYS[3], 'pub', pub)
      end
    end
    local t = redis.call('TIME')
    local now_ms = t[1] .. string.format('%03d', math.floor(tonumber(t[2]) / 1000))
    local fields = cjson.decode(ARGV[10])
    -- reserved fields last, so they win over anything in the update
    local reserved = {'seq', seq, 'last_task', task_id, 'node', node, 'token', token_s,
                      'lane', lane, 'workflow_id', workflow_id, 'updated_at', now_ms}
    for i = 1, #reserved do fields[#fields + 1] = reserved[i] end
    redis.call('HSET', KEYS[3], unpack(fields))
    local entry = {'seq', seq, 'type', task_type, 'task_id', task_id, 'node', node,
                   'token', token_s, 'lane', lane, 'at', now_ms, 'data', ARGV[9]}
    if maxlen ~= '0' then
      hid = redis.call('XADD', KEYS[4], 'MAXLEN', maxlen, '*', unpack(entry))
    else
      hid = redis.call('XADD', KEYS[4], '*', unpack(entry))
    end
    redis.call('HSET', KEYS[5], task_id, seq)
    applied = '1'
    if finished == '1' and retention ~= '0' then
      redis.call('EXPIRE', KEYS[3], retention)
      redis.call('EXPIRE', KEYS[4], retention)
      redis.call('EXPIRE', KEYS[5], retention)
    end
  end
  if pub ~= '' then
    -- the versions whose publishing began at or before this seq
    local n = tonumber(seq)
    local out = ''
    for v, from in string.gmatch(pub, '(%d+):(%d+)') do
      if tonumber(from) <= n then out = out .. ',' .. v end
    end
    if out ~= '' then pubv = string.sub(out, 2) end
  end
end
if (op == 'ack' or op == 'apply_ack') and entry_id ~= '' then
  redis.call('XACK', KEYS[2], group, entry_id)
  if delete_acked == '1' then
    redis.call('XDEL', KEYS[2], entry_id)
  end
end
return decision .. ' ' .. seq .. ' ' .. fence_s .. ' ' .. applied .. ' ' .. hid .. ' ' .. pubv
