using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.InteropServices;
using System.Threading.Channels;

namespace DmaBroker.Integration.Tests;

/// <summary>
/// A real process (<c>dotnet X.dll</c>): a client program built next to the tests, or the broker
/// itself (<see cref="LiveBroker"/>). Its output lines as a stream, its exit, and POSIX signals.
/// Disposing it kills its process tree; so does the test host's exit, for any still running then.
/// </summary>
public sealed partial class ClientProcess : IAsyncDisposable
{
    private const int SigInt = 2;
    private const int SigKill = 9;
    private const int SigCont = 18;
    private const int SigStop = 19;
    private const string StderrPrefix = "stderr: ";
    private static readonly TimeSpan KillTimeout = TimeSpan.FromSeconds(10);
    /// <summary>The processes started and not yet disposed (a set: the values mean nothing).</summary>
    private static readonly ConcurrentDictionary<Process, byte> Running = new();

    private readonly Process _process;
    private readonly Channel<string> _lines = Channel.CreateUnbounded<string>();
    private readonly ConcurrentQueue<string> _transcript = new();
    private readonly TaskCompletionSource _outputEnded = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private int _openStreams = 2;

    static ClientProcess()
    {
        // Ignored signals stay ignored across exec. A test run started in the background of a
        // script ('dotnet test &') ignores SIGINT, and so would every client it starts: none could
        // be interrupted. Only an ignored SIGINT is reset; a handler the runtime installed stays.
        if (IsIgnored(SigInt))
            SetSignalDisposition(SigInt, 0 /* SIG_DFL */);
        // A test that never got to dispose its processes (the host ended mid-test) leaves none behind.
        AppDomain.CurrentDomain.ProcessExit += (_, _) =>
        {
            foreach (var process in Running.Keys)
                KillTree(process);
        };
    }

    private ClientProcess(Process process, string name)
    {
        _process = process;
        Name = name;
        _process.OutputDataReceived += (_, e) => Push(e.Data);
        _process.ErrorDataReceived += (_, e) => Push(e.Data is null ? null : StderrPrefix + e.Data);
        _process.BeginOutputReadLine();
        _process.BeginErrorReadLine();
    }

    public int Pid => _process.Id;

    /// <summary>The program's name and pid, for messages.</summary>
    public string Name { get; }

    /// <summary>Every line printed so far, stdout and stderr (prefixed "stderr: ") in arrival order.</summary>
    public string Transcript => string.Join('\n', _transcript);

    /// <summary>The lines printed on stdout so far.</summary>
    public IReadOnlyList<string> Stdout => [.. _transcript.Where(l => !l.StartsWith(StderrPrefix, StringComparison.Ordinal))];

    /// <summary>The lines printed on stderr so far, without the prefix.</summary>
    public IReadOnlyList<string> Stderr => [.. _transcript.Where(l => l.StartsWith(StderrPrefix, StringComparison.Ordinal)).Select(l => l[StderrPrefix.Length..])];

    /// <summary>Starts <c>dotnet <paramref name="dll"/> args…</c>; a relative <paramref name="dll"/> is in the test output directory.</summary>
    public static ClientProcess Start(string dll, params IEnumerable<string> args) => Start(new ProcessSetup(), dll, args);

    /// <summary>As <see cref="Start(string, IEnumerable{string})"/>, with environment variables and a working directory of its own.</summary>
    public static ClientProcess Start(ProcessSetup setup, string dll, params IEnumerable<string> args) =>
        Launch(DotnetCommand(dll, args), Path.GetFileNameWithoutExtension(dll), setup, withInput: false);

    /// <summary>
    /// Starts another program (found on PATH), such as <c>node</c>, named <paramref name="name"/> in
    /// messages; with <paramref name="withInput"/>, the test writes its stdin (<see cref="WriteLineAsync"/>).
    /// </summary>
    public static ClientProcess StartProgram(string program, string name, bool withInput, params IEnumerable<string> args)
    {
        var start = new ProcessStartInfo(program);
        foreach (var a in args)
            start.ArgumentList.Add(a);
        return Launch(start, name, new ProcessSetup(), withInput);
    }

    /// <summary>Writes a line to the program's stdin (started with input) and flushes it.</summary>
    public async Task WriteLineAsync(string line)
    {
        await _process.StandardInput.WriteLineAsync(line);
        await _process.StandardInput.FlushAsync();
    }

    /// <summary>
    /// Starts <c>dotnet <paramref name="dll"/> args…</c> on a pseudo-terminal (util-linux
    /// <c>script</c>), as a person at a terminal runs it: the transcript is what the terminal showed.
    /// With <paramref name="stdoutFile"/>, its stdout goes to that file instead and only stderr
    /// stays on the terminal.
    /// </summary>
    public static ClientProcess StartOnTerminal(string dll, string? stdoutFile, params IEnumerable<string> args)
    {
        var dotnet = DotnetCommand(dll, args);
        var command = string.Join(' ', new[] { dotnet.FileName }.Concat(dotnet.ArgumentList).Select(ShellQuote));
        if (stdoutFile is not null)
            command += " > " + ShellQuote(stdoutFile);
        var start = new ProcessStartInfo("script") { ArgumentList = { "--quiet", "--return", "--command", command, "/dev/null" } };
        // A colour terminal, whatever the test host's own environment says (CI has no TERM).
        start.Environment["TERM"] = "xterm-256color";
        start.Environment.Remove("NO_COLOR");
        return Launch(start, Path.GetFileNameWithoutExtension(dll) + " on a terminal", new ProcessSetup(), withInput: false);
    }

    private static ProcessStartInfo DotnetCommand(string dll, IEnumerable<string> args)
    {
        var dotnet = Environment.GetEnvironmentVariable("DOTNET_HOST_PATH") is { Length: > 0 } host ? host : "dotnet";
        var start = new ProcessStartInfo(dotnet);
        start.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, dll));
        foreach (var a in args)
            start.ArgumentList.Add(a);
        return start;
    }

    private static string ShellQuote(string word) => "'" + word.Replace("'", "'\\''", StringComparison.Ordinal) + "'";

    private static ClientProcess Launch(ProcessStartInfo start, string name, ProcessSetup setup, bool withInput)
    {
        start.RedirectStandardInput = withInput;
        start.WorkingDirectory = setup.WorkingDirectory ?? "";
        foreach (var (variable, value) in setup.Environment)
            start.Environment[variable] = value;
        start.RedirectStandardOutput = true;
        start.RedirectStandardError = true;
        start.UseShellExecute = false;
        var process = Process.Start(start) ?? throw new InvalidOperationException($"could not start {name}");
        Running.TryAdd(process, 0);
        return new ClientProcess(process, $"{name} (pid {process.Id})");
    }

    /// <summary>Starts <c>dotnet dmactl.dll --broker address args…</c>.</summary>
    public static ClientProcess StartDmactl(string brokerAddress, params string[] args) =>
        Start("dmactl.dll", ["--broker", brokerAddress, .. args]);

    /// <summary>Starts the streaming sample driver on one device; it prints "ready: session S, …" once streaming.</summary>
    public static ClientProcess StartStreamingDriver(string brokerAddress, string device, params string[] args) =>
        Start("StreamingDriver.dll", ["--broker", brokerAddress, "--device", device, .. args]);

    /// <summary>Starts the edu sample driver on one device; it runs its checks and exits.</summary>
    public static ClientProcess StartEduDriver(string brokerAddress, string device) =>
        Start("EduDriver.dll", "--broker", brokerAddress, "--device", device);

    /// <summary>Starts the NVMe sample driver on one device; it writes, reads back and checks blocks, then exits.</summary>
    public static ClientProcess StartNvmeDriver(string brokerAddress, string device, params string[] args) =>
        Start("NvmeDriver.dll", ["--broker", brokerAddress, "--device", device, .. args]);

    /// <summary>As <see cref="StartNvmeDriver(string, string, string[])"/>, with <c>--pause-before-io</c>: it waits for a line on stdin (<see cref="WriteLineAsync"/>) before its first I/O.</summary>
    public static ClientProcess StartPausedNvmeDriver(string brokerAddress, string device, params string[] args) =>
        Launch(DotnetCommand("NvmeDriver.dll", ["--broker", brokerAddress, "--device", device, "--pause-before-io", .. args]), "NvmeDriver", new ProcessSetup(), withInput: true);

    /// <summary>Waits for an output line containing <paramref name="text"/>; fails on exit or timeout.</summary>
    public async Task<string> WaitForLineAsync(string text, TimeSpan timeout) =>
        await WaitForLineOrExitAsync(text, timeout)
            ?? throw new Xunit.Sdk.XunitException($"{Name} exited without printing '{text}'; it printed:\n{Transcript}");

    /// <summary>
    /// Waits for an output line containing <paramref name="text"/>, or for the output to end (the
    /// process exited: null); fails on timeout.
    /// </summary>
    public async Task<string?> WaitForLineOrExitAsync(string text, TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await foreach (var line in _lines.Reader.ReadAllAsync(cts.Token))
            {
                if (line.Contains(text, StringComparison.Ordinal))
                    return line;
            }
            return null;
        }
        catch (OperationCanceledException)
        {
            throw new Xunit.Sdk.XunitException($"{Name} did not print '{text}' within {timeout}; it printed:\n{Transcript}");
        }
    }

    /// <summary>Forgets the lines not read yet, so the next wait sees only what is printed from now on.</summary>
    public void SkipPendingLines()
    {
        while (_lines.Reader.TryRead(out _))
        {
        }
    }

    /// <summary>Waits for the process to exit and its output to end; returns the exit code (128 + n for signal n).</summary>
    public async Task<int> WaitForExitAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await _process.WaitForExitAsync(cts.Token);
            await _outputEnded.Task.WaitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            throw new Xunit.Sdk.XunitException($"{Name} did not exit within {timeout}; it printed:\n{Transcript}");
        }
        return _process.ExitCode;
    }

    public bool HasExited => _process.HasExited;

    /// <summary>SIGINT, as Ctrl-C: the client stops gracefully.</summary>
    public void Interrupt() => Signal(SigInt);

    /// <summary>SIGKILL: the process dies at once, without closing anything itself.</summary>
    public void Kill() => Signal(SigKill);

    /// <summary>SIGSTOP: the process freezes, its connection stays open.</summary>
    public void Stop() => Signal(SigStop);

    public void Continue() => Signal(SigCont);

    /// <summary>
    /// Waits until every thread of the process is stopped (SIGSTOP is delivered asynchronously: a
    /// thread running on another core stops a moment after kill(2) returns), reading each
    /// thread's state in /proc until <paramref name="timeout"/>.
    /// </summary>
    public async Task WaitUntilStoppedAsync(TimeSpan timeout)
    {
        using var cts = new CancellationTokenSource(timeout);
        while (!Directory.GetDirectories($"/proc/{Pid}/task").All(IsStopped))
            await Task.Yield();

        bool IsStopped(string task)
        {
            cts.Token.ThrowIfCancellationRequested();
            try
            {
                // stat: "tid (comm) S …"; the state follows the last ')', as comm may hold one.
                var stat = File.ReadAllText(Path.Combine(task, "stat"));
                return stat[(stat.LastIndexOf(')') + 2)..] is ['T' or 't', ..];
            }
            catch (Exception e) when (e is FileNotFoundException or DirectoryNotFoundException)
            {
                return true; // the thread had exited
            }
        }
    }

    private void Signal(int signal)
    {
        if (Kill(_process.Id, signal) != 0)
            throw new InvalidOperationException($"kill({_process.Id}, {signal}) failed: errno {Marshal.GetLastPInvokeError()}");
    }

    // Called by both stdout and stderr readers; null is the end of one of them.
    private void Push(string? line)
    {
        if (line is not null)
        {
            _transcript.Enqueue(line);
            _lines.Writer.TryWrite(line);
        }
        else if (Interlocked.Decrement(ref _openStreams) == 0)
        {
            _lines.Writer.TryComplete();
            _outputEnded.TrySetResult();
        }
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            KillTree(_process);
            await _process.WaitForExitAsync().WaitAsync(KillTimeout);
        }
        // The last lines it printed, for the transcript.
        await _outputEnded.Task.WaitAsync(KillTimeout);
        Running.TryRemove(_process, out _);
        _process.Dispose();
    }

    // SIGKILL also ends a stopped process.
    private static void KillTree(Process process)
    {
        try
        {
            process.Kill(entireProcessTree: true);
        }
        catch (InvalidOperationException)
        {
            // It exited meanwhile.
        }
    }

    // Linux: /proc/self/status lists the ignored signals as a hex mask, bit n-1 for signal n.
    private static bool IsIgnored(int signal)
    {
        var line = File.ReadLines("/proc/self/status").FirstOrDefault(l => l.StartsWith("SigIgn:", StringComparison.Ordinal));
        return line is not null
            && ulong.TryParse(line.AsSpan("SigIgn:".Length).Trim(), System.Globalization.NumberStyles.HexNumber, System.Globalization.CultureInfo.InvariantCulture, out var mask)
            && (mask & (1UL << (signal - 1))) != 0;
    }

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    private static partial int Kill(int pid, int signal);

    [LibraryImport("libc", EntryPoint = "signal")]
    private static partial nint SetSignalDisposition(int signal, nint handler);
}

/// <summary>What a started process gets besides its arguments: variables added to (or, null, removed from) the test's environment, and a working directory.</summary>
public sealed record ProcessSetup
{
    public IReadOnlyDictionary<string, string?> Environment { get; init; } = new Dictionary<string, string?>();

    public string? WorkingDirectory { get; init; }
}
