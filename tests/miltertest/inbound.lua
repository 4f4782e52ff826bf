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

-- miltertest defines SMFIC_* only for connect, helo, mail and rcpt; Postfix sends the end-of-message
-- macros ({i}) with command 'E' (SMFIC_BODYEOB) right before the end of the message.
local SMFIC_BODYEOB = string.byte("E")

local REPLY_NAMES = {
	[SMFIR_ACCEPT] = "accept",
	[SMFIR_CONTINUE] = "continue",
	[SMFIR_REJECT] = "reject",
	[SMFIR_TEMPFAIL] = "tempfail",
	[SMFIR_DISCARD] = "discard",
	[SMFIR_REPLYCODE] = "replycode",
}

local function value(name)
	local v = _G[name]
	if v == nil or v == "" then
		return nil
	end
	return v
end

local function need(name)
	local v = value(name)
	if v == nil then
		error("missing -D " .. name .. "=...", 0)
	end
	return v
end

local function ok(err, step)
	-- miltertest functions return nil on success and an error string on failure.
	if err ~= nil then
		error(step .. ": " .. tostring(err), 0)
	end
end

local function brackets(address)
	return "<" .. address .. ">"
end

local function reply_name(conn)
	local r = mt.getreply(conn)
	return REPLY_NAMES[r] or string.format("%q", string.char(r))
end

-- A milter SMTP session as Postfix's smtpd runs it; steps the milter negotiated away are skipped,
-- as Postfix skips them (miltertest errors on them instead).
local function connect()
	local conn = mt.connect(need("socket"), 40, 0.25)
	if conn == nil then
		error("mt.connect(" .. need("socket") .. ") failed", 0)
	end
	ok(mt.negotiate(conn, nil, nil, nil), "mt.negotiate")
	ok(mt.macro(conn, SMFIC_CONNECT,
		"j", "mx.example.test",
		"{daemon_name}", "mx.example.test",
		"v", "Postfix 3.7"), "mt.macro(connect)")
	if not mt.test_option(conn, SMFIP_NOCONNECT) then
		ok(mt.conninfo(conn, "mail.customer.test", "192.0.2.25"), "mt.conninfo")
	end
	if not mt.test_option(conn, SMFIP_NOHELO) then
		ok(mt.helo(conn, "mail.customer.test"), "mt.helo")
	end
	return conn
end

local function send(conn, headers, body)
	local env_from = need("env_from")
	-- {auth_authen} comes with MAIL FROM, and only after a successful AUTH; {i} does not exist yet.
	if value("auth_login") then
		ok(mt.macro(conn, SMFIC_MAIL,
			"{mail_addr}", env_from,
			"{auth_type}", "PLAIN",
			"{auth_authen}", value("auth_login")), "mt.macro(mail)")
	else
		ok(mt.macro(conn, SMFIC_MAIL, "{mail_addr}", env_from), "mt.macro(mail)")
	end
	if not mt.test_option(conn, SMFIP_NOMAIL) then
		ok(mt.mailfrom(conn, brackets(env_from)), "mt.mailfrom")
		if mt.getreply(conn) ~= SMFIR_CONTINUE then
			error("MAIL FROM answered " .. reply_name(conn), 0)
		end
	end
	ok(mt.macro(conn, SMFIC_RCPT, "{rcpt_addr}", need("rcpt")), "mt.macro(rcpt)")
	if not mt.test_option(conn, SMFIP_NORCPT) then
		ok(mt.rcptto(conn, brackets(need("rcpt"))), "mt.rcptto")
	end
	if not mt.test_option(conn, SMFIP_NOHDRS) then
		for _, h in ipairs(headers) do
			ok(mt.header(conn, h[1], h[2]), "mt.header(" .. h[1] .. ")")
		end
	end
	if not mt.test_option(conn, SMFIP_NOEOH) then
		ok(mt.eoh(conn), "mt.eoh")
	end
	if not mt.test_option(conn, SMFIP_NOBODY) then
		ok(mt.bodystring(conn, body), "mt.bodystring")
	end
	-- Postfix names the queue id macro "i"; libmilter answers getsymval("{i}") with it.
	ok(mt.macro(conn, SMFIC_BODYEOB, "i", need("qid")), "mt.macro(eom)")
	ok(mt.eom(conn), "mt.eom")
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
