-- One inbound mail through the real `postroom milter`, sent the way Postfix's smtpd sends it, and
-- postroom's end-of-message edits checked.  Run by tests/test_miltertest.py:
--
--   miltertest -D socket=unix:/path/milter.sock -D qid=4ABC123 -D expect=ticket ... -s inbound.lua
--
-- Everything scenario-specific arrives as a -D global (miltertest defines each as a Lua string):
--   socket, qid                                  where the milter listens; the Postfix queue id
--   env_from, rcpt, header_from, subject,
--   message_id                                   the mail (envelope addresses without <>)
--   in_reply_to, forged_owner, auth_login        optional: threading header, a forged X-Postroom-Owner
--                                                header, an SMTP AUTH login (submission port)
--   expect                                       "ticket", "untouched" or "degraded"
--   ticket, tag, owner, state, new_subject       for expect=ticket: what postroom must write
--   reroute_to                                   for expect=ticket: the folder address replacing rcpt
--
-- Debian's miltertest exits 1 without printing a Lua error, so the body runs under pcall and the
-- error is printed here.

local S = dofile(lib)
local value, need, ok, brackets, reply_name = S.value, S.need, S.ok, S.brackets, S.reply_name
local send = S.send

local function connect()
	return S.connect("mx.example.test", "mail.customer.test", "192.0.2.25")
end

-- Every failed expectation is collected, so one run reports all of them.
local failures = {}

local function expect(cond, what)
	if not cond then
		table.insert(failures, what)
	end
end

local POSTROOM_HEADERS = {
	"X-Postroom-Ticket", "X-Postroom-Owner", "X-Postroom-State", "X-Postroom-Priority",
	"X-Postroom-Status", "X-Postroom-Tags", "X-Postroom-Linked",
}

-- miltertest cannot list the captured edits; show at least the headers postroom added.
local function added_headers(conn)
	local lines = {}
	for _, name in ipairs(POSTROOM_HEADERS) do
		local n = 0
		while true do
			local v = mt.getheader(conn, name, n)
			if v == nil then
				break
			end
			table.insert(lines, string.format("  added %s: %s", name, v))
			n = n + 1
		end
	end
	return table.concat(lines, "\n")
end

local function check_ticket(conn)
	local n, tag = need("ticket"), need("tag")
	local mark = tag .. " #" .. n
	local subject = need("new_subject")
	expect(mt.eom_check(conn, MT_HDRCHANGE, "Subject", subject), "Subject not changed to " .. subject)
	expect(mt.eom_check(conn, MT_HDRADD, "X-Postroom-Ticket", n .. " (" .. tag .. ")"),
		"X-Postroom-Ticket " .. n .. " (" .. tag .. ") not added")
	local owner = need("owner") .. " (" .. mark .. ")"
	expect(mt.eom_check(conn, MT_HDRADD, "X-Postroom-Owner", owner), "X-Postroom-Owner " .. owner .. " not added")
	local state = need("state") .. " (" .. mark .. ")"
	expect(mt.eom_check(conn, MT_HDRADD, "X-Postroom-State", state), "X-Postroom-State " .. state .. " not added")
	expect(mt.eom_check(conn, MT_HDRADD, "X-Postroom-Priority"), "X-Postroom-Priority not added")
	expect(not mt.eom_check(conn, MT_HDRADD, "X-Postroom-Status"), "X-Postroom-Status added to a good delivery")
	if value("forged_owner") then
		-- A deletion is a change to the empty value; the forged copy is the first and only one.
		expect(mt.eom_check(conn, MT_HDRCHANGE, "X-Postroom-Owner", ""), "forged X-Postroom-Owner not removed")
		expect(mt.eom_check(conn, MT_HDRDELETE, "X-Postroom-Owner", 1), "forged X-Postroom-Owner #1 not deleted")
	else
		expect(not mt.eom_check(conn, MT_HDRDELETE), "a header was deleted though none was forged")
	end
	local rcpt = brackets(need("rcpt"))
	if value("reroute_to") then
		expect(mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " not deleted")
		local target = brackets(value("reroute_to"))
		expect(mt.eom_check(conn, MT_RCPTADD, target), "recipient " .. target .. " not added")
	else
		expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
	end
end

local function check_untouched(conn)
	expect(not mt.eom_check(conn, MT_HDRADD), "a header was added")
	expect(not mt.eom_check(conn, MT_HDRCHANGE), "a header was changed or deleted")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
end

local function check_degraded(conn)
	expect(mt.eom_check(conn, MT_HDRADD, "X-Postroom-Status", "degraded"), "X-Postroom-Status: degraded not added")
	expect(not mt.eom_check(conn, MT_HDRCHANGE, "Subject"), "Subject changed without a ticket")
	expect(not mt.eom_check(conn, MT_HDRADD, "X-Postroom-Ticket"), "X-Postroom-Ticket added without a ticket")
	local rcpt = brackets(need("rcpt"))
	expect(not mt.eom_check(conn, MT_RCPTDELETE, rcpt), "recipient " .. rcpt .. " deleted")
end

local CHECKS = { ticket = check_ticket, untouched = check_untouched, degraded = check_degraded }

local function main()
	mt.set_timeout(30)
	local check = CHECKS[need("expect")]
	if check == nil then
		error("unknown -D expect=" .. need("expect"), 0)
	end
	local headers = {
		{ "From", "Customer <" .. need("header_from") .. ">" },
		{ "To", need("rcpt") },
		{ "Subject", need("subject") },
		{ "Message-ID", need("message_id") },
		{ "Date", "Mon, 02 Jun 2025 10:00:00 +0200" },
		{ "MIME-Version", "1.0" },
		{ "Content-Type", "text/plain; charset=utf-8" },
	}
	if value("in_reply_to") then
		table.insert(headers, { "In-Reply-To", value("in_reply_to") })
		table.insert(headers, { "References", value("in_reply_to") })
	end
	if value("forged_owner") then
		table.insert(headers, { "X-Postroom-Owner", value("forged_owner") })
	end

	local conn = connect()
	send(conn, headers, "Hello team,\r\nplease help.\r\n")
	expect(mt.getreply(conn) == SMFIR_ACCEPT, "end of message answered " .. reply_name(conn) .. ", not accept")
	check(conn)
	local reply, added = reply_name(conn), added_headers(conn)
	mt.disconnect(conn)
	if #failures > 0 then
		error(table.concat(failures, "\n") .. "\n" .. added, 0)
	end
	mt.echo("ok: " .. need("expect") .. ", " .. reply .. "\n" .. added)
end

local passed, err = pcall(main)
if not passed then
	print("FAILED: " .. tostring(err))
	error(err, 0)
end
