import java.io.ByteArrayOutputStream;
import java.io.PrintStream;
import java.lang.reflect.InvocationTargetException;
import java.lang.reflect.Method;

/**
 * Runs a pixelmed validator's main once per file in one JVM (tests/test_conformance.py,
 * pixelmed_batch): a JVM per file starts, loads and compiles pixelmed's rules cold each time
 * (~10 s an SR); in one JVM every file after the first runs warm, in about half that.
 *
 * Usage: java -cp pixelmed.jar PixelmedBatch.java VALIDATOR_CLASS FILE...
 *
 * Prints, for the Nth file, the line "=== pixelmed-batch: file N ===" and then what the
 * validator's main printed for it: its standard output then its standard error, as
 * pixelmed() reads a run of its own; a line break ends it, so the next separator starts a line.
 */
public class PixelmedBatch {
    public static void main(String[] args) throws Exception {
        Method validator = Class.forName(args[0]).getMethod("main", String[].class);
        PrintStream out = System.out;
        PrintStream err = System.err;
        for (int n = 1; n < args.length; n++) {
            ByteArrayOutputStream printed = new ByteArrayOutputStream();
            ByteArrayOutputStream complained = new ByteArrayOutputStream();
            System.setOut(new PrintStream(printed, true));
            System.setErr(new PrintStream(complained, true));
            try {
                validator.invoke(null, (Object) new String[] {args[n]});
            } catch (InvocationTargetException e) {  // an Error escaped main: report it for this file only
                e.getCause().printStackTrace();
            } finally {
                System.setOut(out);
                System.setErr(err);
            }
            printed.write(complained.toByteArray());
            byte[] output = printed.toByteArray();
            out.println("=== pixelmed-batch: file " + n + " ===");
            out.write(output);
            if (output.length > 0 && output[output.length - 1] != '\n') {
                out.println();
            }
        }
        out.flush();
    }
}
